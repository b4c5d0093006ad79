"""The run directory of an imported Hugging Face model (read by ``moelab.train.run.load_run``).

Layout (docs/INTERFACES.md, "imported Hugging Face run")::

    RUN/config.json        RunConfig (model: a descriptive ModelConfig; data: tokenizer="pretrained")
                           + "hf": {format, family, model_type, architecture, source, dtype,
                                    tokenizer: {eos_id, bos_id, pad_id}, layers: {"<block>": {moe, experts}}}
    RUN/hf/                the HF config.json (+ generation_config.json) and tokenizer files (no weights)
    RUN/tokenizer.json     the model's fast tokenizer
    RUN/checkpoints/step_000000/{model.safetensors, state.json}   HFMoEModel.state_dict() (HF names under
                           "hf.", MoE blocks as "hf.model.layers.<i>.mlp.moe.<MoELayer keys>")
    RUN/summary.json       params total/active, family, source

The MoE layers are rebuilt from ``hf.layers`` (their saved MoEConfigs), so a run whose routers were
swapped (``swap_routers``) or whose experts were pruned loads as saved.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from moelab.data.corpus import DataConfig
from moelab.errors import MoelabError
from moelab.layers.config import MoEConfig
from moelab.models.config import ModelConfig
from moelab.models.hf.families import family_of
from moelab.models.hf.model import HFMoEModel, build_layer
from moelab.models.hf.tokenizer import PretrainedTokenizer

HF_RUN_FORMAT = 1
HF_DIR = "hf"


def model_config_for(model: HFMoEModel) -> ModelConfig:
    """A descriptive moelab ModelConfig of the HF model (sizes, MoE blocks, per-block MoE configs)."""
    c = model.hf.config
    specs = model.layer_specs
    first = min(specs)
    base = MoEConfig.from_dict(specs[first]["moe"])
    overrides = {str(i): {k: v for k, v in s["moe"].items() if base.to_dict().get(k) != v}
                 for i, s in specs.items()}
    return ModelConfig(
        vocab_size=int(c.vocab_size), d_model=int(c.hidden_size), n_layers=int(c.num_hidden_layers),
        n_heads=int(c.num_attention_heads), max_seq_len=int(getattr(c, "max_position_embeddings", 2048)),
        d_ff_dense=int(getattr(c, "intermediate_size", None) or base.d_ff), moe=base, moe_layers=sorted(specs),
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        layer_overrides={k: v for k, v in overrides.items() if v},
    )


def hf_section(model: HFMoEModel, tokenizer: PretrainedTokenizer, source: str) -> dict[str, Any]:
    c = model.hf.config
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return {"format": HF_RUN_FORMAT, "family": model.family.name, "model_type": c.model_type,
            "architecture": type(model.hf).__name__, "source": source, "dtype": dtype,
            "tokenizer": tokenizer.specials(),
            "layers": {str(i): {"moe": dict(s["moe"]), "experts": dict(s["experts"])}
                       for i, s in sorted(model.layer_specs.items())}}


def refresh_specs(model: HFMoEModel) -> None:
    """Re-read every MoE layer's MoEConfig into ``layer_specs`` (after swaps or rebuilds)."""
    for i, layer in model.moe_layers():
        old = model.layer_specs.get(i, {"experts": {}})
        model.layer_specs[i] = {"moe": layer.cfg.to_dict(), "experts": old.get("experts", {})}


def save_hf_run(model: HFMoEModel, tokenizer: PretrainedTokenizer, run_dir: str | Path, *,
                source: str = "", hf_tokenizer: Any = None, step: int = 0, overwrite: bool = False,
                seq_len: int = 256, data_source: str = "embedded") -> Path:
    """Write ``model`` as a run directory (see the module docstring)."""
    from moelab.train import checkpoint as ckpt
    from moelab.train.config import RunConfig

    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise MoelabError(f"--out={str(run_dir)!r} exists and is not empty; choose another or pass --overwrite")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    refresh_specs(model)
    mc = model_config_for(model)
    data = DataConfig(source=data_source, tokenizer="pretrained", vocab_size=max(260, tokenizer.vocab_size),
                      seq_len=min(seq_len, mc.max_seq_len))
    cfg = RunConfig(model=mc, data=data).to_dict()
    cfg["hf"] = hf_section(model, tokenizer, source)
    hf_dir = run_dir / HF_DIR
    model.hf.config.save_pretrained(str(hf_dir))
    gen = getattr(model.hf, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(hf_dir))
    if hf_tokenizer is not None:
        hf_tokenizer.save_pretrained(str(hf_dir))
    tokenizer.save(run_dir / "tokenizer.json")
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    ckpt.save_checkpoint(run_dir / "checkpoints", step, SimpleNamespace(state_dict=lambda: sd), None,
                         extra={"imported_from": source})
    (run_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    counts = model.num_parameters()
    summary = {"step": step, "interrupted": False, "imported": True, "family": model.family.name, "source": source,
               "params_total": counts["total"], "params_active": counts["active"]}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return run_dir


def copy_hf_section(src_run: Path, dst_run: Path, model: HFMoEModel) -> None:
    """Make ``dst_run`` (being written by the trainer, ``train.init_from=src_run``) an imported run too:
    the HF folder and the ``hf`` section of config.json (with the model's current MoE layers)."""
    src_cfg = json.loads((Path(src_run) / "config.json").read_text())
    h = dict(read_hf_section(src_cfg, Path(src_run)))
    refresh_specs(model)
    h["layers"] = {str(i): {"moe": dict(s["moe"]), "experts": dict(s["experts"])}
                   for i, s in sorted(model.layer_specs.items())}
    h["init_from"] = str(Path(src_run).resolve())
    if (Path(dst_run) / HF_DIR).resolve() != (Path(src_run) / HF_DIR).resolve():
        shutil.copytree(Path(src_run) / HF_DIR, Path(dst_run) / HF_DIR, dirs_exist_ok=True)
    p = Path(dst_run) / "config.json"
    cfg = json.loads(p.read_text())
    cfg["hf"] = h
    p.write_text(json.dumps(cfg, indent=2) + "\n")


def read_hf_section(config: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    h = config.get("hf")
    if not isinstance(h, dict) or h.get("format") != HF_RUN_FORMAT:
        got = h.get("format") if isinstance(h, dict) else h
        raise MoelabError(f"{run_dir}/config.json: hf.format={got!r} is not supported; expected {HF_RUN_FORMAT}")
    for key in ("family", "layers", "tokenizer"):
        if key not in h:
            raise MoelabError(f"{run_dir}/config.json: the hf section has no {key!r}")
    return h


def build_from_run(run_dir: Path, h: dict[str, Any]) -> HFMoEModel:
    """The HF model from RUN/hf/config.json with the saved MoE layers installed (weights not loaded)."""
    from moelab.models.hf.convert import transformers_offline

    tf = transformers_offline()
    family = family_of(h["family"])
    hf_cfg = tf.AutoConfig.from_pretrained(str(run_dir / HF_DIR), local_files_only=True)
    hf_model = tf.AutoModelForCausalLM.from_config(hf_cfg)
    specs = {int(i): s for i, s in h["layers"].items()}
    model = HFMoEModel(hf_model, family, specs)
    for i, s in sorted(specs.items()):
        model.install(i, build_layer(MoEConfig.from_dict(s["moe"]), s.get("experts", {})))
    dtype = getattr(torch, h.get("dtype", "float32"))
    model.to(dtype)
    for _, layer in model.moe_layers():
        if layer.router.aux_free is not None:
            layer.router.aux_free.float()
    return model


def load_hf_run(run_dir: str | Path, step: int | None = None, *, device: str | torch.device = "cpu") -> Any:
    """``LoadedRun`` of an imported run (what ``moelab.train.run.load_run`` returns for it)."""
    from moelab.train import checkpoint as ckpt
    from moelab.train.run import LoadedRun, load_config, read_config_dict

    run_dir = Path(run_dir)
    h = read_hf_section(read_config_dict(run_dir), run_dir)
    config = load_config(run_dir)
    tokenizer = PretrainedTokenizer.load(run_dir / "tokenizer.json", **h["tokenizer"])
    model = build_from_run(run_dir, h)
    path = ckpt.find_checkpoint(run_dir / "checkpoints", step)
    sd, _, state = ckpt.read_checkpoint(path, with_optimizer=False)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        bad = (missing or unexpected)[0]
        raise MoelabError(f"checkpoint {str(path)!r} does not match the run's model: tensor {bad} is "
                          f"{'missing' if missing else 'unexpected'} ({len(missing)} missing, {len(unexpected)} unexpected)")
    model.to(device).eval()
    return LoadedRun(model=model, config=config, tokenizer=tokenizer, step=int(state["step"]), run_dir=run_dir)


def import_to_run(path: str | Path, out: str | Path, *, dtype: str = "float32", overwrite: bool = False,
                  seq_len: int = 256, data_source: str = "embedded", swap_router: str | None = None,
                  router_kwargs: dict[str, Any] | None = None) -> Path:
    """``moelab hf import``: a local HF folder -> a run directory with the model's own tokenizer;
    ``swap_router``: replace every router (``moelab.models.router_swap.swap_routers``) first."""
    from moelab.models.hf.convert import check_folder, from_pretrained

    folder, _ = check_folder(path)
    hf_tok, tok = load_tokenizer(folder)
    model = from_pretrained(folder, dtype=dtype)
    if swap_router is not None:
        from moelab.models.router_swap import swap_routers

        swap_routers(model, swap_router, router_kwargs=router_kwargs, freeze_experts=False)
    return save_hf_run(model, tok, out, source=str(folder.resolve()), hf_tokenizer=hf_tok,
                       overwrite=overwrite, seq_len=seq_len, data_source=data_source)


def load_tokenizer(folder: Path) -> tuple[Any, PretrainedTokenizer]:
    """``(transformers tokenizer, PretrainedTokenizer)`` from the folder, offline."""
    from moelab.models.hf.convert import transformers_offline
    from moelab.models.hf.tokenizer import from_transformers

    tf = transformers_offline()
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((folder / n).is_file() for n in names):
        raise MoelabError(f"folder {str(folder)!r} has no tokenizer (expected tokenizer.json or tokenizer_config.json)")
    try:
        hf_tok = tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise MoelabError(f"the tokenizer in {str(folder)!r} could not be loaded: {_first_line(e)}") from None
    hf_cfg = tf.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    return hf_tok, from_transformers(hf_tok, hf_cfg)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
