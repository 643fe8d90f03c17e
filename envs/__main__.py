"""`python -m envs list` prints every domain name; `python -m envs show <name>` prints what its shift changes."""
import sys

from envs.domains import DOMAINS, domain_info

USAGE = "usage: python -m envs list | python -m envs show <domain>"


def main(argv: list[str]) -> int:
    if argv[:1] == ["list"] and len(argv) == 1:
        print("\n".join(DOMAINS))
        return 0
    if argv[:1] == ["show"] and len(argv) == 2:
        info = domain_info(argv[1])
        print(f"{info.name}: {info.env_id}, observation {info.obs_dim}, action {info.act_dim}")
        if not info.changes:
            print("  the original task, no change")
        print(f"  {'element':<28} {'attribute':<9} {'original':>34}    shifted")
        for change in info.changes:
            print(f"  {change}")
        return 0
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
