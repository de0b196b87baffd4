"""One quantization run through the one block loop, streamed: embeddings, every block, head.

:func:`embeddings_and_inputs` loads the embeddings, lets the method transform them, writes them out and
captures block 0's calibration inputs; :func:`quantize_blocks` runs the loop, and after each block records
its report rows, rounds it when it stays in memory, writes its tensors and checkpoints the run (its searched
transforms, the next block's inputs, then ``state.json``); :func:`head` does the final norm and lm_head.
``pipeline.quantize`` strings them together; ``pipeline.quantize_loaded`` uses the same functions without
an output folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .capture.activations import Activations
from .capture.loop import run_blocks
from .capture.quantize import MethodRun, export_blocker
from .capture.solve import expert_tokens
from .export.compressed_tensors import part_tensors
from .export.partial import PartialRun
from .utils.dist import Dist


@dataclass
class LoopResult:
    rows: dict[str, dict] = field(default_factory=dict)  # per-linear report rows
    expert_tokens: dict[int, list[int]] = field(default_factory=dict)  # block -> routed tokens per expert
    results: dict = field(default_factory=dict)  # name -> QuantResult (kept only without an output folder)


def placement(options, partial) -> str:
    if options.offload_activations == "disk" and partial is None:
        raise ValueError("--offload-activations disk needs an --out folder to hold them")
    return options.offload_activations


def quantize_blocks(source, run: MethodRun, acts, loop: LoopResult, *, keep: bool, start: int = 0, writer=None,
                    partial: PartialRun | None = None, options=None, keep_results: bool = False, rank_dir=None,
                    storage: dict | None = None):
    """The one block loop with what quantization does after each block: record, write (each linear on its
    ``storage`` scheme), checkpoint (rank 0 the run state; another rank of a distributed run its activations,
    in ``rank_dir``)."""
    exportable = export_blocker(run.cfg) is None

    def done(i, ctx, outcome, nxt):
        solved = outcome.solved
        loop.rows.update(solved.rows)
        tokens = expert_tokens(ctx, solved.rows)
        if tokens is not None:
            loop.expert_tokens[i] = tokens
        if keep_results:
            loop.results.update(solved.results)
        if keep:
            run.round_block(ctx.block)
        if writer is not None and exportable:
            writer.write(f"block-{i:05d}", part_tensors(ctx.adapter, ctx.block, f"{ctx.name}.", solved.results,
                                                        run.storage_dtype, storage=storage))
        if partial is not None or rank_dir is not None:
            _checkpoint(partial, rank_dir, run, i, outcome, nxt, loop)
        if options is not None and options.kill_after_block == i:
            os.kill(os.getpid(), options.kill_signal)

    return run_blocks(source, acts, run.process, start=start, keep=keep, done=done, desc=f"{run.cfg.method} blocks")


def _checkpoint(partial: PartialRun | None, rank_dir, run: MethodRun, i: int, outcome, acts, loop: LoopResult) -> None:
    """Persist block i: its searched transforms, the next block's inputs (every rank its own), then the state
    that points to them (rank 0, once every rank's inputs are on disk)."""
    from .transforms.artifact import Transforms

    dist = run.solve.dist
    tr = Transforms(online_linears=outcome.online, smooth=outcome.search.scales, clips=outcome.search.clips)
    if tr and partial is not None:
        tr.save(partial.dir / "parts" / f"transforms-{i:05d}.mt")
    last = i + 1 == run.adapter.num_blocks
    folder = partial.acts_dir if partial is not None else rank_dir
    if acts is not None and not last:
        acts.save(folder)
    dist.barrier()
    if partial is not None:
        partial.commit(blocks_done=i + 1, acts_gen=acts.gen if acts is not None else None, rows=loop.rows,
                       expert_tokens={str(k): v for k, v in loop.expert_tokens.items()}, notes=run.notes)
    dist.barrier()
    if acts is not None and not last:
        acts.prune(folder)


def resumed_transforms(partial: PartialRun, run: MethodRun, start: int) -> None:
    """Searched transforms of the blocks an earlier process finished (leftovers of an unfinished one go)."""
    from .transforms.artifact import Transforms

    for f in sorted((partial.dir / "parts").glob("transforms-*.mt")):
        if int(f.stem.split("-")[1]) >= start:
            f.unlink()
            continue
        t = Transforms.load(f)
        run.transforms.online_linears += t.online_linears
        run.transforms.smooth += t.smooth
        run.transforms.clips.update(t.clips)


def embeddings_and_inputs(source, run: MethodRun, calib, cfg, writer, options, partial, device, resident,
                          dist: Dist = Dist(), rank_dir=None):
    """Load the embeddings, let the method transform them, write them, capture block 0's inputs (this rank's
    share of the calibration batches), free them."""
    emb = source.load_embeddings()
    try:
        run.on_embeddings()
        if writer is not None and export_blocker(cfg) is None:
            spec = source.adapter.spec
            writer.write("embed", part_tensors(source.adapter, emb, f"{spec.embed}.", {}, run.storage_dtype))
        if calib is None:
            return None
        if calib.ids.numel() == 0:
            raise ValueError("the calibration set is empty: give --calib a source with text and --nsamples >= 1")
        batches = list(calib.ids.split(cfg.batch_size))
        if len(batches) < dist.world:
            raise ValueError(f"{calib.ids.shape[0]} calibration sequences in batches of {cfg.batch_size} make "
                             f"{len(batches)} batches, fewer than the {dist.world} ranks: raise --nsamples or lower "
                             "--batch-size")
        folder = partial.acts_dir if partial else rank_dir  # another rank's share: its own folder
        return Activations.capture(source.model, source.adapter.blocks[0], [batches[k] for k in dist.mine(len(batches))],
                                   device, placement(options, partial or rank_dir), folder)
    finally:
        source.release_embeddings(keep=resident)


def head(source, run: MethodRun, writer, resident: bool) -> None:
    """Final norm and lm_head: transformed by the method, written, freed (kept when resident)."""
    norm, lm_head = source.load_head()
    try:
        run.on_head()
        if resident:
            run.round_block(source.model)
        if writer is not None and export_blocker(run.cfg) is None:
            spec, tied = source.adapter.spec, bool(getattr(source.model.config, "tie_word_embeddings", False))
            tensors = part_tensors(source.adapter, norm, f"{spec.final_norm}.", {}, run.storage_dtype)
            if not tied:
                tensors.update(part_tensors(source.adapter, lm_head, f"{spec.lm_head}.", {}, run.storage_dtype))
            writer.write("head", tensors)
    finally:
        source.release_head(keep=resident)
