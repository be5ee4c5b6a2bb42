"""Leapfrog predictor forward + backward at the paper's sizes: closed-form grad V vs autograd reference.

The closed form wins by doing fewer matrix products: no double backward, and one grad V evaluation
shared between consecutive half-kicks (steps + 1 evaluations instead of 2 * steps).
"""

from __future__ import annotations

import torch

from hamjepa import checks
from hamjepa.arguments import Parser
from hamjepa.bench.timing import interleaved_medians
from hamjepa.config.sections import MAX_BATCH, MAX_LEAPFROG_STEPS
from hamjepa.method.predictors import HamiltonianPredictor


def main(argv: list[str]) -> None:
    parser = Parser(prog="python -m hamjepa.bench predictor", description=__doc__)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--q-dim", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    checks.integer("--batch", args.batch, 1, MAX_BATCH)  # the bounds' reasons: config/sections.py
    checks.integer("--q-dim", args.q_dim, 1)
    checks.integer("--hidden", args.hidden, 1)
    checks.integer("--depth", args.depth, 1)
    checks.integer("--steps", args.steps, 1, MAX_LEAPFROG_STEPS)
    checks.integer("--rounds", args.rounds, 1)

    torch.manual_seed(0)
    z = torch.randn(args.batch, 2 * args.q_dim, requires_grad=True)
    predictor = HamiltonianPredictor(args.q_dim, args.hidden, args.depth, steps=args.steps)
    rollouts = {
        # what we train with: closed-form grad V, steps + 1 evaluations, one ordinary backward
        "closed_form": predictor.forward,
        # the textbook reference: autograd grad V (double backward), 2 * steps evaluations
        "reference": predictor.reference_forward,
        # the reference with shared evaluations: isolates the double backward's own cost
        "autograd_shared": lambda x: predictor._rollout(x, 1, predictor.autograd_grad_potential, True),
    }

    def forward_backward(rollout):
        def run():
            predictor.zero_grad(set_to_none=True)
            z.grad = None
            rollout(z).pow(2).mean().backward()
        return run

    medians = interleaved_medians({name: forward_backward(r) for name, r in rollouts.items()}, args.rounds)
    print(f"leapfrog predictor forward+backward: batch {args.batch}, q_dim {args.q_dim}, hidden {args.hidden}, "
          f"depth {args.depth}, steps {args.steps}, {torch.get_num_threads()} threads, median of {args.rounds}")
    for name, seconds in medians.items():
        print(f"  {name:16s} {seconds * 1e3:8.1f} ms")
    print(f"  speed-up vs reference (double backward, 2*steps grad V):   "
          f"{medians['reference'] / medians['closed_form']:.2f}x")
    print(f"  speed-up vs autograd with shared grad V (double backward only): "
          f"{medians['autograd_shared'] / medians['closed_form']:.2f}x")
