from .rc_cifar import *
