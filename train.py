""" Train an RC network with the paper's protocol.

    accelerate launch train.py --config train_configs/rc4_cifar10.yaml [--key value ...]
    python train.py --model rc4_cifar --data_dir ../shared/data/cifar10 --epochs 1

The loop lives in `timm_rc.train` (also installed as the `timm-rc-train` command).
"""
from timm_rc.train import main

if __name__ == '__main__':
    main()
