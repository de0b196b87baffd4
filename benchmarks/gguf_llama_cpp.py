"""moeq's GGUF export run in llama.cpp (llama-cpp-python) against moeq's own in-memory quantized model.

For each bundled model and plan: quantize (GPTQ, group 32, WikiText-2 calibration), write compressed-tensors
and GGUF, then compute WikiText-2 test perplexity on the first N windows both in moeq (fp32, in memory)
and in llama.cpp (CPU, fp32 KV cache), the logit differences and the file sizes. Prints a Markdown table;
``--json`` saves the rows.

    python benchmarks/gguf_llama_cpp.py --windows 128 --json benchmarks/results/gguf_llama_cpp.json
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

PLANS = {
    "W4 g32": lambda QA, BP: BP(default=QA(4, 32, True)),
    "W3 g32 experts, W8 attention": lambda QA, BP: BP(default=QA(3, 32, True),
                                                       rules=[(r".*self_attn\..*", QA(8, 32, True))]),
    # --kquant-scales: needs input widths that are multiples of 256 (mixtral-tiny; not qwen2-moe-tiny's experts)
    "Q3_K experts, Q6_K attention": lambda QA, BP: BP(default=QA(3, 16, True, True),
                                                       rules=[(r".*self_attn\..*", QA(6, 16, True, True))]),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="qwen2-moe-tiny,mixtral-tiny")
    ap.add_argument("--windows", type=int, default=128, help="first N WikiText-2 test windows of 512 tokens")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import llama_cpp

    from moeq.config import BitPlan, CalibSpec, QuantConfig
    from moeq.evaluate.perplexity import wikitext2_windows
    from moeq.models.loading import load_tokenizer
    from moeq.models.bundled import bundled_path
    from moeq.pipeline import RunOptions, quantize
    from moeq.quant.primitives import QuantArgs

    rows = []
    for model in a.models.split(","):
        tok = load_tokenizer(str(bundled_path(model)))
        windows = wikitext2_windows(tok, 512, None).ids[: a.windows]  # (N, 512)
        for label, make in PLANS.items():
            with tempfile.TemporaryDirectory() as d:
                out = Path(d) / "o"
                c = QuantConfig(method="gptq", plan=make(QuantArgs, BitPlan),
                                calib=CalibSpec("wikitext2", nsamples=a.nsamples, seqlen=512))
                try:
                    rep, m = quantize(model, c, out, skip_eval=True, return_model=True,
                                      options=RunOptions(formats=("compressed-tensors", "gguf")))
                except ValueError as e:
                    print(f"{model} / {label}: skipped ({e})", flush=True)
                    continue
                llm = llama_cpp.Llama(model_path=str(out / "model.gguf"), logits_all=True, n_ctx=512, n_batch=512,
                                      n_ubatch=512, n_threads=2, type_k=0, type_v=0, verbose=False)
                nll = {"moeq": 0.0, "llama.cpp": 0.0}
                secs = {"moeq": 0.0, "llama.cpp": 0.0}
                rowmax = []
                for w in windows:
                    ids = w.tolist()
                    t = time.perf_counter()
                    with torch.no_grad():
                        ours = m(input_ids=w[None]).logits[0].float()  # (T, V)
                    secs["moeq"] += time.perf_counter() - t
                    t = time.perf_counter()
                    llm.reset()
                    llm.eval(ids)
                    theirs = torch.tensor(np.array(llm.scores[: len(ids)], dtype=np.float32))  # (T, V)
                    secs["llama.cpp"] += time.perf_counter() - t
                    tgt = torch.tensor(ids[1:])
                    for k, lg in (("moeq", ours), ("llama.cpp", theirs)):
                        lp = torch.log_softmax(lg[:-1].double(), -1)
                        nll[k] -= float(lp[torch.arange(len(tgt)), tgt].sum())
                    rowmax += (theirs - ours).abs().amax(-1).tolist()
                llm.close()
                n = len(windows) * (windows.shape[1] - 1)
                ppl = {k: math.exp(v / n) for k, v in nll.items()}
                rows.append({"model": model, "plan": label, "avg_bits": rep["avg_bits"],
                             "ppl_moeq": ppl["moeq"], "ppl_llama_cpp": ppl["llama.cpp"],
                             "ppl_ratio": ppl["llama.cpp"] / ppl["moeq"],
                             "median_max_abs_logit_diff": float(np.median(rowmax)),
                             "p99_max_abs_logit_diff": float(np.percentile(rowmax, 99)),
                             "ct_mib": rep["size"]["checkpoint_bytes"] / 2**20, "gguf_mib": rep["gguf"]["bytes"] / 2**20,
                             "gguf_types": rep["gguf"]["types"], "f32_linears": len(rep["gguf"]["f32_linears"]),
                             "seconds_moeq": secs["moeq"], "seconds_llama_cpp": secs["llama.cpp"]})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\nWikiText-2 test, first {a.windows} windows of 512 tokens; GPTQ g32, {a.nsamples} x 512 calibration")
    print("| model | plan | moeq ppl | llama.cpp ppl | ratio | median / p99 max abs logit diff | CT MiB | GGUF MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['plan']} | {r['ppl_moeq']:.3f} | {r['ppl_llama_cpp']:.3f} | {r['ppl_ratio']:.4f} | "
              f"{r['median_max_abs_logit_diff']:.3f} / {r['p99_max_abs_logit_diff']:.3f} | {r['ct_mib']:.1f} | "
              f"{r['gguf_mib']:.1f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
