"""`zinfer register --from-path`: the time to fill a registration in from a model's files (in process, and the
whole CLI command with its interpreter start), against loading the same model with its library (the weights read),
which is what it avoids. Target: ≤ 1 s for a folder, the CLI included.

    .venv/bin/python bench/fromfiles.py [--rounds 3]
"""

from __future__ import annotations

import subprocess
import sys

from common import MODELS, REPO, arguments, record, timed, tiny_models

from zinfer.shared.fromfiles import registration_from_path
from zinfer.shared.tinymodels import make_small_llama


def main() -> None:
    args = arguments(3)
    models = tiny_models()
    small = make_small_llama(MODELS)
    cases = {"small Llama folder (104 MB)": (small["small_pytorch"], "LLM"),
             "small Llama GGUF (104 MB)": (small["small_gguf"], "LLM"),
             "MiniLM folder": (models["embedding"], "embedding"),
             "tiny cross-encoder folder": (models["rerank"], "rerank")}
    rows = {}
    for name, (path, kind) in cases.items():
        fill = timed(lambda p=path: registration_from_path(str(p)), args.rounds)
        cli = timed(lambda p=path: subprocess.run([sys.executable, "-m", "zinfer", "register", "--from-path", str(p),
                                                   "--dry-run"], check=True, capture_output=True, cwd=REPO),
                    args.rounds)
        if str(path).endswith(".gguf"):
            import llama_cpp

            load = timed(lambda p=path: llama_cpp.Llama(str(p), verbose=False).close(), args.rounds)
        elif kind == "LLM":
            from transformers import AutoModelForCausalLM, AutoTokenizer

            load = timed(lambda p=path: (AutoTokenizer.from_pretrained(str(p)),
                                         AutoModelForCausalLM.from_pretrained(str(p))), args.rounds)
        elif kind == "embedding":
            from sentence_transformers import SentenceTransformer

            load = timed(lambda p=path: SentenceTransformer(str(p), device="cpu"), args.rounds)
        else:
            from sentence_transformers import CrossEncoder

            load = timed(lambda p=path: CrossEncoder(str(p), device="cpu"), args.rounds)
        rows[name] = {"fill_s": round(fill, 4), "cli_s": round(cli, 3), "load_s": round(load, 3)}
    print(f"{'model':<30}{'fill (in process)':>18}{'CLI command':>13}{'library load':>14}{'fill / load':>12}")
    for name, r in rows.items():
        print(f"{name:<30}{r['fill_s'] * 1000:>15.1f} ms{r['cli_s']:>11.2f} s{r['load_s']:>12.2f} s"
              f"{r['fill_s'] / r['load_s']:>12.3f}")
    worst = max(r["cli_s"] for r in rows.values())
    print(f"\ntarget: the CLI command <= 1 s -> worst {worst:.2f} s")
    record("fromfiles", {"rows": rows, "worst_cli_s": worst})


if __name__ == "__main__":
    main()
