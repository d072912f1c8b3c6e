"""Bounded YAML reading for recipes (fine-tune and merge) that may come from strangers.

PyYAML's safe loader builds no arbitrary objects, but aliases still let a few hundred bytes describe a structure
of billions of nodes (the "billion laughs" bomb: each level refers to the one before several times). The graph
PyYAML builds shares those nodes, so the bomb goes off later, in whatever walks the result (a JSON dump, a
validator). Here the source size, the number of aliases, the nesting depth and the number of nodes the document
would have with every alias expanded are all bounded (`tinkerlm.limits`), while it is composed, before any Python
object is built. Reference: YAML 1.1 anchors and aliases, https://yaml.org/spec/1.1/#id899912
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tinkerlm import limits
from tinkerlm.errors import TinkerError


def read_text(path: str | Path, what: str = "recipe") -> str:
    """The UTF-8 text of a YAML file of at most `limits.MAX_YAML_BYTES` bytes.

    Raises:
        TinkerError: missing, not a regular file, too large, or not UTF-8.
    """
    path = Path(path)
    if not path.exists():
        raise TinkerError(f"{path}: no such {what} file")
    if not path.is_file():  # a FIFO or /dev/zero would block or never end
        raise TinkerError(f"{path}: not a regular file; give the {what} as a .yaml file")
    try:
        with open(path, "rb") as f:
            data = f.read(limits.MAX_YAML_BYTES + 1)
    except OSError as e:
        raise TinkerError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    if len(data) > limits.MAX_YAML_BYTES:
        raise TinkerError(f"{path}: {what} is larger than {limits.MAX_YAML_BYTES:,} bytes; a recipe is a few KB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TinkerError(f"{path}: {what} is not UTF-8 text (bad byte at offset {e.start})") from None


def load(path: str | Path, what: str = "recipe") -> Any:
    """Parse a YAML file with `yaml.safe_load` semantics under the limits above.

    Raises:
        TinkerError: naming the file (and line, where YAML says) for unreadable files, invalid YAML, too many
            aliases, too deep nesting, or a document that expands past `limits.MAX_YAML_NODES` nodes.
    """
    return loads(read_text(path, what), str(path))


def loads(text: str, where: str) -> Any:
    """`load` for text already read; `where` names it in errors."""
    import yaml

    if len(text.encode("utf-8", "surrogatepass")) > limits.MAX_YAML_BYTES:
        raise TinkerError(f"{where}: larger than {limits.MAX_YAML_BYTES:,} bytes; a recipe is a few KB")
    loader = _loader_class()(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, where)
        return loader.construct_document(node)
    except _Refused as e:
        raise TinkerError(f"{where}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise TinkerError(f"{where}: not valid YAML{at} ({problem})") from None
    except (ValueError, OverflowError, RecursionError) as e:  # e.g. an integer of 5,000 digits
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TinkerError(f"{where}: a value cannot be read ({first[:200]})") from None
    finally:
        loader.dispose()


class _Refused(Exception):
    pass


_LOADER = None


def _loader_class():
    """A SafeLoader that counts aliases and nesting while composing (built lazily: importing yaml costs time)."""
    global _LOADER
    if _LOADER is not None:
        return _LOADER
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        def __init__(self, stream):
            super().__init__(stream)
            self._aliases = 0
            self._depth = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                self._aliases += 1
                if self._aliases > limits.MAX_YAML_ALIASES:
                    line = self.peek_event().start_mark.line + 1
                    raise _Refused(
                        f"more than {limits.MAX_YAML_ALIASES} aliases (*name) at line {line}; write the values out"
                    )
                return super().compose_node(parent, index)
            self._depth += 1
            if self._depth > limits.MAX_JSON_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise _Refused(f"nested deeper than {limits.MAX_JSON_DEPTH} levels at line {line}")
            try:
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

    _LOADER = BoundedLoader
    return _LOADER


def _check_expansion(root, where: str) -> None:
    """Count the nodes of the document as if every alias were written out (memoised per shared node, so the count
    itself costs time linear in the composed graph), and refuse past `limits.MAX_YAML_NODES`."""
    import yaml

    size: dict[int, int] = {}
    # Iterative post-order walk (no recursion limit to hit): children before parents. PyYAML lets an alias refer
    # to its own ancestor (`&a [*a]`), so meeting a node that is still on the current path is refused.
    stack = [(root, False)]
    on_path: set[int] = set()
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            if isinstance(node, yaml.MappingNode):
                kids = [x for pair in node.value for x in pair]
            elif isinstance(node, yaml.SequenceNode):
                kids = node.value
            else:
                kids = []
            total = 1 + sum(size[id(k)] for k in kids)
            if total > limits.MAX_YAML_NODES:
                raise _Refused(
                    f"expands to more than {limits.MAX_YAML_NODES:,} values through its aliases (an alias bomb?)"
                )
            size[key] = total
            continue
        if key in size:
            continue
        if key in on_path:
            raise _Refused("an alias refers to a value that contains it (a recursive structure)")
        on_path.add(key)
        stack.append((node, True))
        if isinstance(node, yaml.MappingNode):
            stack.extend((x, False) for pair in node.value for x in pair if id(x) not in size)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((x, False) for x in node.value if id(x) not in size)
