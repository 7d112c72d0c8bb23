from .rc_cifar import *
from .rc_timm import *
