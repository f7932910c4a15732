"""Manifests as text: multi-document YAML or JSON in, resources out, and back to text.

Owns decoding (a strict YAML loader that rejects duplicate keys, JSON, kubectl's List and
array forms), document numbering and the YAML/JSON dump format. The only module that imports
``yaml``; knows no validation rules (``decode.py``) and does no file I/O (callers pass text).
"""
from __future__ import annotations

import json
import re
from typing import Any, Iterable, Iterator

import yaml

from controller.api.decode import decode_document
from controller.api.errors import ManifestError, Problem
from controller.api.resources import KIND_CLASSES, Resource, to_dict

_SEPARATOR = re.compile(r"^---(?:[ \t].*)?$")


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys and keeps timestamps as strings.

    ``line_offset`` makes marks count lines of the whole file when a document is loaded alone.
    """

    line_offset = 0

    def get_mark(self) -> yaml.Mark:
        mark = super().get_mark()
        mark.line += self.line_offset
        return mark

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = first.get(key)
                except TypeError:
                    continue  # an unhashable key; SafeConstructor reports it
                if earlier is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None,
                        f"duplicate key {key!r} (first defined at line {earlier.start_mark.line + 1})",
                        key_node.start_mark)
                first[key] = key_node
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 timestamps would turn `creationTimestamp: 2024-01-01T00:00:00Z` into a datetime.
StrictLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


class _Dumper(yaml.SafeDumper):
    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)  # indent list items under their key


def parse_manifests(text: str, *, source: str = "<stdin>",
                    default_namespace: str = "default") -> list[Resource]:
    """Decode and validate every document of ``text``; all or nothing.

    ``text`` is multi-document YAML (``---`` separated; empty documents skipped) or JSON (an
    object, an array of objects, or several objects one after another). Any document may be a
    ``{"kind": "List", "items": [...]}`` or a list of resources, as kubectl accepts.
    Documents are numbered from 1 in messages, empty ones included; an error inside a List
    names ``items[i]`` in its field path.

    Returns the resources in order. Raises ``ManifestError`` listing every problem of every
    document (YAML and JSON syntax errors name the line) if there is any.
    """
    resources: list[Resource] = []
    problems: list[Problem] = []
    for index, doc, problem in _documents(text, source):
        if problem is not None:
            problems.append(problem)
            continue
        if doc is None:
            continue
        for path, item in _items(doc):
            resource, ref, errs = decode_document(item, default_namespace=default_namespace, path=path)
            problems += [Problem(source, index, ref, e.path, e.message) for e in errs]
            if resource is not None:
                resources.append(resource)
    if problems:
        raise ManifestError(problems)
    return resources


def _items(doc: object) -> Iterator[tuple[str, object]]:
    """The resources of one document: itself, or the items of a List or of an array."""
    if isinstance(doc, list):
        for i, item in enumerate(doc):
            yield f"[{i}]", item
    elif isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
        for i, item in enumerate(doc["items"]):
            yield f"items[{i}]", item
    else:
        yield "", doc


def _documents(text: str, source: str) -> Iterator[tuple[int, object, Problem | None]]:
    if text.lstrip()[:1] in ("{", "["):
        docs = list(_json_documents(text, source))
        if not any(p for _, _, p in docs):
            yield from docs
            return
        yaml_docs = list(_yaml_documents(text, source))
        # flow-style YAML such as `{apiVersion: ..., kind: Mesh}` is not JSON but is welcome
        yield from (docs if any(p for _, _, p in yaml_docs) else yaml_docs)
        return
    yield from _yaml_documents(text, source)


def _json_documents(text: str, source: str) -> Iterator[tuple[int, object, Problem | None]]:
    decoder = json.JSONDecoder(object_pairs_hook=_no_duplicates)
    pos, index = 0, 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return
        index += 1
        try:
            doc, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield index, None, Problem(source, index, "document", f"line {e.lineno}, column {e.colno}",
                                       f"invalid JSON: {e.msg}")
            return
        except _DuplicateKey as e:
            line = text.count("\n", 0, pos) + 1
            yield index, None, Problem(source, index, "document", f"line {line}",
                                       f"invalid JSON: duplicate key {e.key!r} in the document starting here")
            return
        yield index, doc, None


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        self.key = key
        super().__init__(key)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _yaml_chunks(text: str) -> Iterator[tuple[int, str]]:
    """Split at ``---`` lines (never valid inside a YAML document), with each chunk's first
    line number (0-based). A leading chunk of only blanks and comments is not a document."""
    lines = text.splitlines(keepends=True)
    start = 0
    for n, line in enumerate(lines):
        if _SEPARATOR.match(line.rstrip("\r\n")) and n > start:
            yield start, "".join(lines[start:n])
            start = n
    if start < len(lines):
        yield start, "".join(lines[start:])


def _is_blank(chunk: str) -> bool:
    return all(not line.strip() or line.lstrip().startswith("#") for line in chunk.splitlines())


def _yaml_documents(text: str, source: str) -> Iterator[tuple[int, object, Problem | None]]:
    index = 0
    for first_line, chunk in _yaml_chunks(text):
        if index == 0 and _is_blank(chunk):
            continue
        index += 1
        loader = StrictLoader(chunk)
        loader.line_offset = first_line
        loader.name = source
        try:
            doc = loader.get_single_data()
        except yaml.MarkedYAMLError as e:
            yield index, None, _yaml_problem(source, index, e)
            continue
        except yaml.YAMLError as e:
            yield index, None, Problem(source, index, "document", f"line {first_line + 1}", f"invalid YAML: {e}")
            continue
        finally:
            loader.dispose()
        yield index, doc, None


def _yaml_problem(source: str, index: int, e: yaml.MarkedYAMLError) -> Problem:
    mark = e.problem_mark or e.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "<root>"
    message = e.problem or "syntax error"
    if e.context and e.context_mark:
        message += f" ({e.context} at line {e.context_mark.line + 1})"
    elif e.context:
        message += f" ({e.context})"
    return Problem(source, index, "document", where, f"invalid YAML: {message}")


def _as_list(resources: Iterable[Resource] | Resource) -> list[Resource]:
    return [resources] if isinstance(resources, KIND_CLASSES) else list(resources)  # type: ignore[arg-type]


def dump_yaml(resources: Iterable[Resource] | Resource) -> str:
    """Canonical multi-document YAML: block style, ``---`` between documents, canonical key
    order; ``parse_manifests`` reads it back to equal resources."""
    return yaml.dump_all([to_dict(r) for r in _as_list(resources)], Dumper=_Dumper, sort_keys=False,
                         default_flow_style=False, allow_unicode=True, explicit_start=False)


def dump_json(resources: Iterable[Resource] | Resource) -> str:
    """JSON with indent 2: one object for a single resource, else a ``List`` of them."""
    items = [to_dict(r) for r in _as_list(resources)]
    obj = items[0] if len(items) == 1 else {"apiVersion": "v1", "kind": "List", "items": items}
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
