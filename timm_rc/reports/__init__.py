""" Reports from run folders: `tables` (the paper's tables, mean ± std over seeds), `figures` (the paper's
figures), `formatting` (plain-text and markdown tables). """
