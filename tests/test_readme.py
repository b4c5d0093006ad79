"""The README's self-contained Python examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_moe_layer_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    layer_blocks = [b for b in blocks if "moelab.MoELayer(" in b]
    assert layer_blocks, "the README lost its MoE layer example"
    exec(compile(layer_blocks[0], "README.md", "exec"), {})
    assert "aux_loss" in capsys.readouterr().out
