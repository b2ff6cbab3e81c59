"""hvd_megdet: MegDet with Horovod."""

__version__ = "0.1.0"
