"""Byte-level language models with GrootL: the chain (Mamba) against the causal tree.

Trains small ``transformers.MambaForCausalLM`` models from scratch on English text that
ships with Python (the pydoc topics of ``pydoc_data.topics``, about 465,000 characters,
the last 10% held out), converted with
:func:`~treessm.integrations.transformers.grootl_from_mamba` -- once with ``mode="chain"``
(exactly Mamba) and once with ``mode="causal"`` (every byte below the most similar of the
``k`` bytes before it) -- with the same configuration, parameter count, steps, data order
and initial weights for every seed. Prints one JSON line with the validation bits per byte
of each model and seed, their means, and greedy samples generated through
``model.generate`` with the cache; the same JSON goes to ``--out``::

    python -m treessm.examples.text --out text_out

``--modes chain,causal,paper`` adds the GrootVL authors' construction; its tree is not
causal, so under teacher forcing its predictions read later bytes inside each window and
its bits per byte are no likelihood of a language model (it generates by recomputing the
sequence at every step).

On a CPU the script runs with ``OMP_WAIT_POLICY=PASSIVE`` (it restarts itself with it when
the variable is unset): torch and numba each bring an OpenMP runtime, and on a machine with
few cores their waiting threads spin against each other's work, which made training steps
five times slower on two cores.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from treessm._checks import check_int

__all__ = ["load_text", "make_model", "train", "bits_per_byte", "generate_samples",
           "skip_fraction", "run", "main", "MODES"]

MODES = ("chain", "causal", "paper")
PROMPTS = ("The ", "A class ", "If the ")


def load_text(holdout: float = 0.1):
    """The pydoc topics as UTF-8 bytes, split into the first ``1 - holdout`` (training)
    and the rest (validation), as uint8 tensors."""
    from pydoc_data.topics import topics

    data = "".join(topics.values()).encode("utf-8")
    cut = int(len(data) * (1 - holdout))
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
    return as_tensor(data[:cut]), as_tensor(data[cut:])


def make_model(mode: str, seed: int, hidden_size: int = 64, num_layers: int = 2,
               state_size: int = 4, k: int = 4, context_len: Optional[int] = None):
    """A byte-level ``MambaForCausalLM`` (vocabulary 256, no special tokens), initialised
    from ``seed`` and converted to ``mode``: every mode starts from the same weights."""
    from transformers import MambaConfig, MambaForCausalLM

    from treessm.integrations.transformers import grootl_from_mamba

    config = MambaConfig(vocab_size=256, hidden_size=hidden_size, state_size=state_size,
                         num_hidden_layers=num_layers, pad_token_id=0, bos_token_id=None,
                         eos_token_id=None)
    torch.manual_seed(seed)
    model = MambaForCausalLM(config)
    options = {"causal": dict(k=k), "paper": dict(context_len=context_len)}.get(mode, {})
    grootl_from_mamba(model, mode, **options)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def _batches(data: torch.Tensor, steps: int, batch_size: int, seq_len: int, seed: int):
    """Random windows of ``seq_len + 1`` bytes, the same for every mode of one seed."""
    g = torch.Generator().manual_seed(seed)
    span = torch.arange(seq_len + 1)
    for _ in range(steps):
        start = torch.randint(0, data.shape[0] - seq_len - 1, (batch_size, 1), generator=g)
        yield data[start + span].long()


def train(model, data: torch.Tensor, steps: int, batch_size: int, seq_len: int, seed: int,
          lr: float = 3e-3, desc: str = "train", progress: bool = True) -> float:
    """AdamW with warm-up and cosine decay on next-byte prediction; returns the seconds."""
    from tqdm.auto import tqdm

    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and "A_log" not in n]
    rest = [p for n, p in model.named_parameters() if p.dim() <= 1 or "A_log" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup
        else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    model.train()
    start = time.perf_counter()
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False)
    for batch in _batches(data, steps, batch_size, seq_len, seed):
        loss = F.cross_entropy(model(batch[:, :-1]).logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.update(1)
        bar.set_postfix(bpb=f"{loss.item() / math.log(2):.3f}")
    bar.close()
    return time.perf_counter() - start


@torch.no_grad()
def bits_per_byte(model, data: torch.Tensor, seq_len: int, batch_size: int = 32) -> float:
    """Bits per byte of next-byte prediction over ``data``, cut into consecutive windows
    of ``seq_len`` predictions (every byte but the first is predicted once)."""
    model.eval()
    n = (data.shape[0] - 1) // seq_len
    windows = torch.stack([data[i * seq_len:(i + 1) * seq_len + 1] for i in range(n)]).long()
    rest = data[n * seq_len:].long()
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        batch = windows[i:i + batch_size]
        logits = model(batch[:, :-1], use_cache=False).logits
        total += float(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(),
                                       reduction="sum"))
        count += batch[:, 1:].numel()
    if rest.shape[0] > 1:
        logits = model(rest[None, :-1], use_cache=False).logits
        total += float(F.cross_entropy(logits[0], rest[1:], reduction="sum"))
        count += rest.shape[0] - 1
    return total / count / math.log(2)


@torch.no_grad()
def generate_samples(model, prompts: Sequence[str] = PROMPTS,
                     max_new_tokens: int = 60) -> List[str]:
    """Greedy continuations through ``model.generate`` (with the cache where the mode
    allows), decoded as UTF-8 with replacement characters."""
    model.eval()
    out = []
    for prompt in prompts:
        ids = torch.tensor([list(prompt.encode("utf-8"))])
        seq = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        out.append(bytes(seq[0].tolist()).decode("utf-8", errors="replace"))
    return out


@torch.no_grad()
def skip_fraction(model, data: torch.Tensor, seq_len: int, windows: int = 16) -> List[float]:
    """Per layer of a ``mode="causal"`` model: the fraction of bytes (after the first of a
    window) whose parent in the tree is not the byte just before, over ``windows`` windows
    of ``data``; 0 would make the tree the chain."""
    from treessm.nn.grootl import GrootLMixer

    mixers = [m for m in model.modules() if isinstance(m, GrootLMixer)]
    inputs = {}

    def keep(mod, args):
        inputs[mod] = args[0]

    hooks = [m.register_forward_pre_hook(keep) for m in mixers]
    model.eval()
    n = min(windows, (data.shape[0] - 1) // seq_len)
    batch = torch.stack([data[i * seq_len:(i + 1) * seq_len] for i in range(n)]).long()
    try:
        model(batch, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    out = []
    for mixer in mixers:
        parent = mixer.scan_tree(inputs[mixer]).parent.view(n, seq_len)[:, 1:]
        local = parent - torch.arange(n)[:, None] * seq_len
        out.append(round(float((local != torch.arange(seq_len - 1)).float().mean()), 4))
    return out


def run(out_dir: str, modes: Sequence[str] = ("chain", "causal"),
        seeds: Sequence[int] = (0, 1), steps: int = 300, batch_size: int = 16,
        seq_len: int = 256, hidden_size: int = 64, num_layers: int = 2, state_size: int = 4,
        k: int = 4, lr: float = 3e-3, max_new_tokens: int = 60, eval_bytes: int = 0,
        threads: Optional[int] = None, progress: bool = True) -> Dict:
    """Train and evaluate every mode for every seed; write ``text_results.json`` into
    ``out_dir`` and return the summary."""
    for name, value in (("steps", steps), ("batch_size", batch_size), ("seq_len", seq_len),
                        ("hidden_size", hidden_size), ("num_layers", num_layers),
                        ("state_size", state_size), ("k", k)):
        check_int(value, name, 1)
    if threads is not None:
        check_int(threads, "threads", 1)
        torch.set_num_threads(threads)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes must be a non-empty list of {MODES}, got {list(modes)}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct ints, got {list(seeds)}")
    os.makedirs(out_dir, exist_ok=True)
    begin = time.perf_counter()
    train_data, val_data = load_text()
    if eval_bytes:
        val_data = val_data[:eval_bytes]
    results: Dict[str, Dict] = {}
    params = None
    for mode in modes:
        entry = {"bits_per_byte": {}, "train_seconds": {}, "causal": mode != "paper"}
        for seed in seeds:
            model = make_model(mode, seed, hidden_size, num_layers, state_size, k,
                               context_len=seq_len // 2 if mode == "paper" else None)
            params = sum(p.numel() for p in model.parameters())
            seconds = train(model, train_data, steps, batch_size, seq_len, seed, lr,
                            desc=f"{mode} seed {seed}", progress=progress)
            entry["bits_per_byte"][str(seed)] = round(bits_per_byte(model, val_data, seq_len), 4)
            entry["train_seconds"][str(seed)] = round(seconds, 1)
            if mode == "causal":
                entry.setdefault("skip_fraction_per_layer", {})[str(seed)] = \
                    skip_fraction(model, val_data, seq_len)
            if seed == seeds[0]:
                entry["samples"] = generate_samples(model, max_new_tokens=max_new_tokens)
        values = list(entry["bits_per_byte"].values())
        entry["mean_bits_per_byte"] = round(sum(values) / len(values), 4)
        results[mode] = entry
    summary = {
        "task": "byte-level language modelling of pydoc_data.topics (last 10% held out)",
        "train_bytes": int(train_data.shape[0]), "val_bytes": int(val_data.shape[0]),
        "modes": results, "seeds": list(seeds), "steps": steps, "batch_size": batch_size,
        "seq_len": seq_len, "params": params,
        "config": dict(hidden_size=hidden_size, num_layers=num_layers, state_size=state_size,
                       expand=2, k=k, lr=lr),
        "threads": torch.get_num_threads(), "total_seconds": round(time.perf_counter() - begin, 1),
    }
    with open(os.path.join(out_dir, "text_results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    summary["results_file"] = os.path.join(out_dir, "text_results.json")
    return summary


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for text_results.json")
    parser.add_argument("--modes", default="chain,causal",
                        help="comma-separated GrootL modes (default: chain,causal)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=_positive, default=300)
    parser.add_argument("--batch-size", type=_positive, default=16)
    parser.add_argument("--seq-len", type=_positive, default=256)
    parser.add_argument("--hidden-size", type=_positive, default=64)
    parser.add_argument("--num-layers", type=_positive, default=2)
    parser.add_argument("--state-size", type=_positive, default=4)
    parser.add_argument("-k", type=_positive, default=4, help="candidate parents (causal)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-new-tokens", type=_positive, default=60)
    parser.add_argument("--threads", type=_positive, default=None)
    parser.add_argument("--quick", action="store_true",
                        help="a few steps of a tiny model on 2 kB of validation (smoke test)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    kwargs = dict(modes=[m for m in args.modes.split(",") if m], seeds=args.seeds,
                  steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                  hidden_size=args.hidden_size, num_layers=args.num_layers,
                  state_size=args.state_size, k=args.k, lr=args.lr,
                  max_new_tokens=args.max_new_tokens, threads=args.threads,
                  progress=not args.no_progress)
    if args.quick:
        kwargs.update(steps=3, batch_size=4, seq_len=32, hidden_size=16, num_layers=1,
                      state_size=2, max_new_tokens=8, eval_bytes=2048)
    summary = run(args.out, **kwargs)
    print(json.dumps(summary))
    return summary


def _passive_openmp() -> None:
    """Restart this script with ``OMP_WAIT_POLICY=PASSIVE`` unless the variable is set (the
    OpenMP runtimes read it once, when they load)."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "treessm.examples.text"] + sys.argv[1:])


if __name__ == "__main__":
    _passive_openmp()
    main()
