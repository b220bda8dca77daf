"""Build once what the first real use would otherwise build inside a timed test or job.

    python -m unipipe_ray.runtime.warmup

- converts the packaged SmolLM2 (GGUF -> safetensors) and writes the tiny test model, in the cache dir;
- JIT-compiles DeepSpeed's C++ ops for CPU (the shared-memory comm op and CPU Adam, ~75 s on 2 cores the
  first time), cached in ~/.cache/torch_extensions (TORCH_EXTENSIONS_DIR).
Everything is cached, so a second run takes seconds.
"""

from __future__ import annotations

import time


def main() -> None:
    import torch

    from unipipe_ray.core.models import resolve_model, tiny_model_dir
    from unipipe_ray.runtime.engine import TrainingEngine
    from unipipe_ray.runtime.logs import progress

    started = time.time()
    progress("warmup: model cache ...")
    resolve_model("smollm2-135m")
    tiny_model_dir()
    tiny_model_dir(tie_word_embeddings=False)
    progress("warmup: DeepSpeed CPU ops (first time ~75 s) ...")
    model = torch.nn.Linear(4, 1)
    engine = TrainingEngine(model, lr=1e-3, weight_decay=0.0, max_grad_norm=1.0, total_steps=1, warmup_steps=0,
                    backend="deepspeed", zero_stage=1, offload_optimizer=True)
    engine.backward(engine(torch.ones(2, 4)).sum())
    engine.step()
    progress(f"warmup: done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
