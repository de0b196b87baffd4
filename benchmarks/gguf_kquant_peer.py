"""moeq's K-quant GGUF files against llama.cpp's own quantizer, both run in llama.cpp.

The peer is ``llama_model_quantize`` (llama-quantize's library call, in llama-cpp-python) turning the FP model's
GGUF into one K type for every linear (``pure``; routers, norms and the bf16 embeddings stay as in the FP file, as
in moeq's), without an importance matrix (``llama-imatrix`` is a separate binary, not in llama-cpp-python).
moeq quantizes the same linears onto the same type's grid itself (``--kquant-scales``: Q2_K, Q3_K, Q4_K,
Q5_K, Q6_K) with RTN, GPTQ and the block tuner, calibrated on WikiText-2 train/validation windows, and writes
the GGUF from its integers. Every file is evaluated by llama.cpp (CPU, fp32 KV cache) on the first N
WikiText-2 test windows of 512 tokens: perplexity, and KL(FP || quantized) per token against llama.cpp
running the FP file, so engine, type and bits per weight are the same in each comparison. Every linear's
input width must be a multiple of 256 (mixtral-tiny's are; the other bundled models' 128-wide expert down
projections have no K type). Prints a Markdown table; ``--json`` saves the rows.

    python benchmarks/gguf_kquant_peer.py --types Q4_K,Q2_K --json benchmarks/results/gguf_kquant_peer.json
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

GRIDS = {"Q2_K": (2, 16, False), "Q3_K": (3, 16, True), "Q4_K": (4, 32, False), "Q5_K": (5, 32, False),
         "Q6_K": (6, 16, True)}  # type -> moeq's (bits, group size, symmetric) with --kquant-scales
FTYPES = {"Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K", "Q3_K": "LLAMA_FTYPE_MOSTLY_Q3_K_S", "Q4_K": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
          "Q5_K": "LLAMA_FTYPE_MOSTLY_Q5_K_S", "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K"}  # with pure: that type everywhere


def llama_eval(path: Path, windows: torch.Tensor, fp: list | None) -> tuple[float, float | None, list]:
    """(perplexity, mean KL(FP || this) per token or None, per-window log-probs) of a GGUF in llama.cpp."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=512, n_batch=512, n_ubatch=512,
                          n_threads=2, type_k=0, type_v=0, verbose=False)
    nll, kl, n, logps = 0.0, 0.0, 0, []
    for i, w in enumerate(windows):
        ids = w.tolist()
        llm.reset()
        llm.eval(ids)
        lp = torch.log_softmax(torch.tensor(np.array(llm.scores[: len(ids)], dtype=np.float32))[:-1].double(), -1)
        tgt = torch.tensor(ids[1:])
        nll -= float(lp[torch.arange(len(tgt)), tgt].sum())
        n += len(tgt)
        if fp is not None:
            kl += float((fp[i].exp() * (fp[i] - lp)).sum())  # sum over tokens of KL(FP || quantized)
        else:
            logps.append(lp.float())
    llm.close()
    return math.exp(nll / n), (kl / n if fp is not None else None), logps


def llama_quantize(src: Path, dst: Path, qtype: str) -> None:
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.pure, p.nthread = getattr(llama_cpp, FTYPES[qtype]), True, 2
    p.token_embedding_type = p.output_tensor_type = 30  # ggml's GGML_TYPE_BF16: embeddings kept, as moeq keeps them
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), p) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {qtype}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mixtral-tiny")
    ap.add_argument("--types", default="Q4_K,Q2_K")
    ap.add_argument("--methods", default="rtn,gptq,blocktune")
    ap.add_argument("--windows", type=int, default=128, help="first N WikiText-2 test windows of 512 tokens")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    from moeq.config import BitPlan, CalibSpec, QuantConfig
    from moeq.evaluate.perplexity import wikitext2_windows
    from moeq.export.gguf import write_gguf
    from moeq.models.bundled import bundled_path
    from moeq.models.loading import load_tokenizer
    from moeq.pipeline import RunOptions, quantize
    from moeq.quant.primitives import QuantArgs

    src = bundled_path(a.model)
    windows = wikitext2_windows(load_tokenizer(str(src)), 512, None).ids[: a.windows]  # (N, 512)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        fp_gguf = d / "fp.gguf"
        write_gguf(src, fp_gguf)  # the unquantized model (F32 linears): llama-quantize's input
        ppl, _, fp = llama_eval(fp_gguf, windows, None)
        rows.append({"type": "FP", "method": "FP (llama.cpp)", "ppl": ppl, "kl": 0.0, "seconds": 0.0,
                     "gguf_mib": fp_gguf.stat().st_size / 2**20})
        print(json.dumps(rows[-1]), flush=True)
        for qtype in a.types.split(","):
            bits, gs, sym = GRIDS[qtype]
            t = time.perf_counter()
            llama_quantize(fp_gguf, d / f"llama_{qtype}.gguf", qtype)
            runs = [("llama-quantize (pure, no imatrix)", d / f"llama_{qtype}.gguf", time.perf_counter() - t)]
            for method in a.methods.split(","):
                out = d / f"{method}_{qtype}"
                c = QuantConfig(method=method, plan=BitPlan(default=QuantArgs(bits, gs, sym, superblock=True)),
                                calib=CalibSpec("wikitext2", nsamples=a.nsamples, seqlen=512, seed=a.seed))
                t = time.perf_counter()
                rep = quantize(str(src), c, out, skip_eval=True, options=RunOptions(formats=("gguf",)))
                assert not rep["gguf"]["f32_linears"], rep["gguf"]["f32_linears"]
                runs.append((f"moeq {method}", out / "model.gguf", time.perf_counter() - t))
            for label, path, secs in runs:
                ppl, kl, _ = llama_eval(path, windows, fp)
                rows.append({"type": qtype, "method": label, "ppl": ppl, "kl": kl, "seconds": secs,
                             "gguf_mib": path.stat().st_size / 2**20})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{a.model}, llama.cpp on WikiText-2 test, first {a.windows} windows of 512 tokens; moeq calibration "
          f"{a.nsamples} x 512 WikiText-2 (seed {a.seed})")
    print("| type | quantizer | ppl | KL to FP | time (s) | GGUF MiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['type']} | {r['method']} | {r['ppl']:.3f} | {r['kl']:.5f} | {r['seconds']:.1f} | "
              f"{r['gguf_mib']:.1f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, "windows": a.windows, "nsamples": a.nsamples,
                                            "seed": a.seed, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
