"""Data and expert parallelism on torch.distributed, expert placement (EPLB, LLEP) and offloading.

Modules: ``groups`` (process groups, timeouts), ``ep`` (all-to-all expert dispatch), ``balance``
(balancing statistics summed over data-parallel ranks), ``data_parallel`` (DDP, expert gradients,
global-norm clipping), ``checkpoint`` (torch.distributed.checkpoint, resharding), ``trainer``
(the distributed loop), ``comm_model`` (all-to-all bytes per token), ``placement.eplb`` /
``placement.llep``, ``plan`` (``moelab ep-plan``), ``offload`` (``moelab offload-sim``), ``launch``.
Nothing here is imported by the lower layers; ``moelab train`` dispatches to ``trainer``.
"""
