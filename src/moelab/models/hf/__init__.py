"""Hugging Face models in and out (issue 14): import a local HF MoE checkpoint as a moelab model
whose MoE blocks are ``MoELayer``s, save/load it as a run directory, export moelab models to HF.

``transformers`` is imported lazily, inside the functions that need it, and always offline.
See docs/hf.md and docs/INTERFACES.md ("imported Hugging Face run").
"""

from moelab.models.hf.convert import from_pretrained
from moelab.models.hf.export import export_imported, export_moelab_model, export_run
from moelab.models.hf.families import SUPPORTED
from moelab.models.hf.model import HFMoEModel
from moelab.models.hf.run import import_to_run, load_hf_run, save_hf_run

__all__ = ["SUPPORTED", "HFMoEModel", "export_imported", "export_moelab_model", "export_run", "from_pretrained",
           "import_to_run", "load_hf_run", "save_hf_run"]
