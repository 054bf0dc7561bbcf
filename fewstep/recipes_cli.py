"""`fewstep recipes`: the few-step recipes and samplers with their defaults (no torch import)."""

import json


def add_parser(sub):
    p = sub.add_parser("recipes", help="list the few-step recipes (--recipe NAME) and samplers with their defaults",
                       description="The few-step methods fewstep runs as diffusers' documented schedulers do.")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(func=cmd_recipes)


def cmd_recipes(args):
    from .recipes import RECIPES, SAMPLERS

    if args.json:
        print(json.dumps({name: dict(title=r.title, sampler=r.sampler, a1111_sampler=SAMPLERS[r.sampler].label,
                                     steps=r.steps, guidance=r.guidance, spacing=r.spacing,
                                     timesteps={str(k): list(v) for k, v in r.timesteps.items()}, gamma=r.gamma,
                                     scheduler_config=r.config, guidance_range=list(r.guidance_range),
                                     steps_range=list(r.steps_range), note=r.note)
                          for name, r in RECIPES.items()}, indent=2))
        return 0
    print(f"{'recipe':<14} {'sampler':<8} {'steps':>5} {'guidance':>8}  settings")
    for name, r in RECIPES.items():
        steps = "model" if name == "standard" else str(r.steps)
        guidance = "model" if name == "standard" else f"{r.guidance:g}"
        print(f"{name:<14} {r.sampler:<8} {steps:>5} {guidance:>8}  {r.note}")
    print("\nsamplers: " + ", ".join(f"{s.name} ({s.label}: {s.paper})" for s in SAMPLERS.values()))
    return 0
