#!/usr/bin/env python
"""Held-out exact match of GGUF files in llama.cpp, scored exactly as `qlora-kit eval` / the demo score the
4-bit base + adapter: each record prompted through the prompt contract (`inference.prompts.record_prompt`),
tokenized by the model's tokenizer, greedy up to 32 new tokens (stop at EOS), decoded, `exact_match_one`.

    python scripts/bench_gguf_llama_cpp_em.py --tokenizer BASE_OR_ADAPTER_DIR --eval-file EVAL.jsonl \
        [--limit N] FILE.gguf [FILE.gguf ...]

Prints one JSON line per file: records, exact match, generated tokens and seconds.
"""
import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    from llama_cpp import Llama
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from qlora_kit.inference.evaluate import exact_match_one, read_eval_records
    from qlora_kit.inference.prompts import record_prompt

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--eval-file", required=True)
    p.add_argument("--limit", type=int)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("files", nargs="+")
    args = p.parse_args(argv)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    cases = []
    for i, rec in enumerate(read_eval_records(args.eval_file, args.limit)):
        prompt, reference = record_prompt(tok, rec, where=f"record {i}")
        cases.append((tok(prompt.text, add_special_tokens=prompt.special_tokens).input_ids, reference))
    for path in args.files:
        llm = Llama(model_path=path, n_ctx=512, n_threads=1, verbose=False)
        eos, hits, generated, start = llm.token_eos(), 0, 0, time.perf_counter()
        for ids, reference in tqdm(cases, desc=path.rsplit("/", 1)[-1]):
            out: list[int] = []
            for t in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, reset=True):
                if t == eos:
                    break
                out.append(int(t))
                if len(out) >= args.max_new_tokens:
                    break
            generated += len(out)
            hits += exact_match_one(tok.decode(out, skip_special_tokens=True), reference)
        print(json.dumps({"file": path, "records": len(cases), "exact_match": hits / len(cases),
                          "generated_tokens": generated, "seconds": round(time.perf_counter() - start, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
