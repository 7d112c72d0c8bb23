""" `python -m timm_rc.train.cli` (timm_rc 0.2.0's name): the trainer's command line, `timm_rc.cli.train`. """
if __name__ == '__main__':
    import importlib
    importlib.import_module('timm_rc.cli.train').run()
