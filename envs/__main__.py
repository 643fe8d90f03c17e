"""`python -m envs list` prints every domain name; `python -m envs show <name> [--physics v5]` prints which
physics the domain runs in, its model-wide edits and what its shift changes."""
import sys

from envs.domains import DEFAULT_PHYSICS, DOMAINS, check_physics, domain_info

USAGE = "usage: python -m envs list | python -m envs show <domain> [--physics papers|v5]"


def _table(changes) -> None:
    print(f"  {'element':<28} {'attribute':<9} {'original':>34}    changed")
    for change in changes:
        print(f"  {change}")


def main(argv: list[str]) -> int:
    if argv[:1] == ["list"] and len(argv) == 1:
        print("\n".join(DOMAINS))
        return 0
    if argv[:1] == ["show"] and len(argv) in (2, 4) and (len(argv) == 2 or argv[2] == "--physics"):
        physics = check_physics(argv[3]) if len(argv) == 4 else DEFAULT_PHYSICS
        info = domain_info(argv[1], physics)
        print(f"{info.name}: {info.env_id}, observation {info.obs_dim}, action {info.act_dim}")
        if physics == "papers":
            print("physics: papers (the gym v3 / mujoco-py simulator of the papers and D4RL; --physics v5 for "
                  "Gymnasium's v5 as it ships). Model-wide edits, against the v5 model:")
            _table(info.physics_changes)
            for note in info.semantics:
                print(f"  {note}")
        else:
            print("physics: v5 (Gymnasium's v5 environments as they ship; no model-wide edit)")
        print("shift, against the task in the same physics:")
        if not info.changes:
            print("  the original task, no change")
        else:
            _table(info.changes)
        return 0
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
