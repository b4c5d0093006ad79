"""The ops CLI modules keep static copies of registry names (so `--help` imports no torch): they must agree."""

from moelab.cli.compress_compare import DEFAULT_METHODS
from moelab.cli.finetune import ADAPTER_NAMES
from moelab.cli.upcycle import UPCYCLE_METHODS
from moelab.ops import compare
from moelab.ops.lora import ADAPTERS
from moelab.ops.upcycle import UPCYCLERS


def test_static_names_match_the_registries():
    assert tuple(UPCYCLERS.names()) == UPCYCLE_METHODS
    assert tuple(ADAPTERS.names()) == ADAPTER_NAMES
    assert DEFAULT_METHODS == compare.DEFAULT_METHODS


def test_static_help_listings_match_the_registries():
    from moelab.cli import depth_route, finetune, merge, prune, skip, upcycle
    from moelab.ops.depth import DEPTH_METHODS
    from moelab.ops.merge import MERGE_METHODS
    from moelab.ops.prune import PRUNE_CRITERIA
    from moelab.ops.skip import SKIP_METHODS

    for mod, reg in ((prune, PRUNE_CRITERIA), (merge, MERGE_METHODS), (skip, SKIP_METHODS), (upcycle, UPCYCLERS),
                     (finetune, ADAPTERS), (depth_route, DEPTH_METHODS)):
        assert mod.LISTING == [(e.name, e.description, e.paper) for e in reg.entries()], mod.__name__
