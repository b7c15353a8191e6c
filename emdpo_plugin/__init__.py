"""EM-DPO, Cluster-DPO and MinMax-DPO for heterogeneous annotators, as an OpenRLHF plugin."""

__version__ = "0.1.0"
