"""Calibration token ids for a run: windows of a text source, or an EBSS set the model writes itself.

:func:`make_calibration` makes them from a resolved config; :func:`run_calibration` also keeps them in a
partial run's folder, so ``--resume`` reuses exactly the same ids (and a cached EBSS set needs no model).
"""

from __future__ import annotations

from ..config import QuantConfig
from ..evaluate.perplexity import default_seqlen
from ..utils.dist import Dist
from .windows import CalibSet


def make_calibration(model, tokenizer, model_path: str, cfg: QuantConfig, data_dir=None, device="cpu",
                     dist: Dist = Dist()) -> CalibSet:
    """Calibration token ids: windows of a text source, or an EBSS set the model writes itself (split over the
    ranks of a distributed run; every rank gets the whole set)."""
    from ..methods import resolve_config
    from ..models.adapter import ModelAdapter
    from .ebss import EBSSConfig, ebss_calibration
    from .windows import calibration_windows

    if not cfg.resolved:
        cfg, _ = resolve_config(cfg, is_moe=ModelAdapter.for_model(model).spec.moe is not None)

    seqlen = default_seqlen(model, cfg.calib.seqlen)
    c = cfg.calib
    if c.source == "ebss":
        ecfg = EBSSConfig(num=c.nsamples, length=seqlen, width=c.ebss_width, tau=c.ebss_tau, seed=c.seed,
                          no_repeat_ngram=c.ebss_no_repeat_ngram)
        ids, info = ebss_calibration(model, tokenizer, model_path, ecfg, device, dist)
        notes = [f"EBSS set {'reused from' if info['reused'] else 'generated and cached at'} {info['cache']}"]
        return CalibSet(ids, "ebss", info["cache"], notes)
    return calibration_windows(tokenizer, c.source, c.nsamples, seqlen, c.seed, data_dir)


def run_calibration(partial, whole_model, skeleton, tokenizer, path, cfg, data_dir, device,
                    dist: Dist = Dist()) -> CalibSet:
    """The calibration ids: saved in the partial run (resume), or made now and saved. ``whole_model()`` gives
    the model in memory, for EBSS generation only (a cached set needs no model)."""
    from safetensors.torch import load_file, save_file

    f = partial.dir / "calib.safetensors" if partial is not None else None
    saved = dist.broadcast((load_file(str(f))["ids"], partial.state["calib"]) if f is not None and f.is_file()
                           else None)  # rank 0's saved ids are every rank's
    if saved is not None:
        return CalibSet(saved[0], **saved[1])
    model = skeleton
    if cfg.calib.source == "ebss":
        from .ebss import EBSSConfig, cache_path

        c = cfg.calib
        ecfg = EBSSConfig(num=c.nsamples, length=default_seqlen(skeleton, c.seqlen), width=c.ebss_width,
                          tau=c.ebss_tau, seed=c.seed, no_repeat_ngram=c.ebss_no_repeat_ngram)
        if not dist.broadcast(cache_path(path, ecfg).is_file() if dist.main else None):  # rank 0's cache decides
            model = whole_model()
    calib = make_calibration(model, tokenizer, path, cfg, data_dir, device, dist)
    if f is not None:
        save_file({"ids": calib.ids.contiguous()}, str(f))
        partial.commit(calib={"source": calib.source, "origin": calib.origin, "notes": calib.notes})
    return calib
