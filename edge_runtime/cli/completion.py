"""`edgert completion bash|zsh`: a completion script made from the parser itself (so it cannot
drift from the flags). Install with one command:

    edgert completion bash | sudo tee /etc/bash_completion.d/edgert     # or: eval "$(edgert completion bash)"
    edgert completion zsh > "${fpath[1]}/_edgert"                        # or: eval "$(edgert completion zsh)"
"""

from __future__ import annotations

import argparse
from typing import Any


def _tree(parser: argparse.ArgumentParser, path: str = "") -> dict[str, tuple[list[str], list[str]]]:
    """'' / 'fleet' / ... -> (subcommands, long options shown in --help)."""
    subs: list[str] = []
    opts = sorted(
        {o for a in parser._actions if a.help != argparse.SUPPRESS for o in a.option_strings if o.startswith("--")}
    )
    out: dict[str, tuple[list[str], list[str]]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                subs.append(name)
                out.update(_tree(sub, f"{path} {name}".strip()))
    out[path] = (subs, opts)
    return out


def script(shell: str) -> str:
    from edge_runtime.cli.main import build_parser

    tree = _tree(build_parser())
    cases = []
    for path, (subs, opts) in sorted(tree.items()):
        key = path.replace(" ", "_") or "_"
        cases.append(f'    {key}) words="{" ".join(subs + opts)}" ;;')
    body = "\n".join(cases)
    bash = f"""# edgert completion ({shell}); generated from the parser by `edgert completion {shell}`
_edgert() {{
  local cur path words i w
  cur="${{COMP_WORDS[COMP_CWORD]}}"
  path=""
  for ((i = 1; i < COMP_CWORD; i++)); do
    w="${{COMP_WORDS[i]}}"
    case "$w" in
      -*) ;;
      *) case " $(_edgert_words "${{path:-_}}") " in *" $w "*) path="${{path:+${{path}}_}}$w" ;; esac ;;
    esac
  done
  COMPREPLY=($(compgen -W "$(_edgert_words "${{path:-_}}")" -- "$cur"))
}}
_edgert_words() {{
  case "$1" in
{body}
    *) words="" ;;
  esac
  echo "$words"
}}
complete -o default -F _edgert edgert
"""
    if shell == "zsh":
        return "autoload -U +X bashcompinit && bashcompinit\n" + bash
    return bash


def add_parser(sub: Any) -> None:
    p = sub.add_parser("completion", help="print a shell completion script (bash or zsh)")
    p.add_argument("shell", choices=["bash", "zsh"])
    p.set_defaults(func=lambda args: print(script(args.shell), end="") or 0)
