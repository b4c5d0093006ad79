import sys
from pathlib import Path

# make tests/models/moe_standin.py importable (the stand-in MoE layer used by model/train tests)
sys.path.insert(0, str(Path(__file__).parent))
