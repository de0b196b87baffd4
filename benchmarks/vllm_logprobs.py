"""Serve a moeq W4A16 export in vLLM and compare its log-probabilities with transformers' (GPU only).

NOT RUN YET: no GPU has been available to this project (README "Deploy" says so). It needs a CUDA GPU and
`pip install vllm` in its own environment (vLLM pins its own torch). Usage:

    moeq quantize mixtral-tiny --method gptq --group-size 32 --out runs/mix-w4      # anywhere
    python benchmarks/vllm_logprobs.py runs/mix-w4 --windows 8

For the first ``--windows`` WikiText-2 test windows it asks vLLM for the prompt log-probabilities of every
token (``prompt_logprobs``) and computes the same with transformers (the export loaded by
``from_pretrained``, bf16 on the GPU), then prints the largest and mean absolute difference of the
per-token log-probabilities and both perplexities.
"""

from __future__ import annotations

import argparse
import math


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("export", help="a moeq quantize output (compressed-tensors)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    a = ap.parse_args()

    import torch
    import transformers as T
    from vllm import LLM, SamplingParams

    from moeq.evaluate.perplexity import wikitext2_windows

    tok = T.AutoTokenizer.from_pretrained(a.export)
    windows = wikitext2_windows(tok, a.seqlen, None).ids[: a.windows]  # (N, T)

    llm = LLM(model=a.export, dtype="bfloat16", max_model_len=a.seqlen, enforce_eager=True)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": w.tolist()} for w in windows], params)
    vllm_lp = [[next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]] for o in outs]  # (N, T-1)
    del llm

    model = T.AutoModelForCausalLM.from_pretrained(a.export, dtype=torch.bfloat16).cuda().eval()
    diffs, nll_v, nll_t, n = [], 0.0, 0.0, 0
    with torch.no_grad():
        for w, lv in zip(windows, vllm_lp):
            logits = model(input_ids=w[None].cuda()).logits[0, :-1].float()  # (T-1, V)
            lt = torch.log_softmax(logits, -1)[torch.arange(len(w) - 1), w[1:].cuda()].cpu()  # (T-1,)
            lv = torch.tensor(lv)
            diffs.append((lv - lt).abs())
            nll_v, nll_t, n = nll_v - float(lv.sum()), nll_t - float(lt.sum()), n + len(lv)
    d = torch.cat(diffs)
    print(f"{a.export}: {a.windows} windows x {a.seqlen}: |logprob vLLM - transformers| max {d.max():.4f}, "
          f"mean {d.mean():.5f}; perplexity vLLM {math.exp(nll_v / n):.3f}, transformers {math.exp(nll_t / n):.3f}")


if __name__ == "__main__":
    main()
