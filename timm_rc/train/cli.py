""" `timm-rc-train`: the same entry point as `python train.py` / `accelerate launch train.py`. """
from .loop import main

if __name__ == '__main__':
    main()
