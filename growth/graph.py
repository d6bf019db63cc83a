"""NetGraph: a network as a networkx DiGraph of layers, with shapes, validation and storage.

Nodes hold a kind (see `growth.layers`), hyperparameters (`attrs`) and tensors (weights and
buffers). Edges carry activations (a multigraph: a node may read one source twice); the `port`
attribute orders a node's inputs. Tensors are
treated as immutable values: operators replace them and never write into them, so copying a
graph is cheap and an operator never changes its input graph.
"""

from __future__ import annotations

import json
import keyword
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import torch

from growth.errors import CheckpointError, GraphError, ShapeError
from growth.io import atomic_write, load_tensors
from growth.layers import (
    PARAMETRIC,
    Attrs,
    Kind,
    Shape,
    buffer_names,
    build_module,
    complete_attrs,
    kind_of,
)

FORMAT_VERSION = 1
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RESERVED = frozenset(dir(torch.nn.Module())) | {"forward", "code", "graph"}


@dataclass
class Node:
    """One layer: its kind, hyperparameters and tensors (weights and buffers)."""

    name: str
    kind: str
    attrs: Attrs = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def copy(self) -> Node:
        return Node(self.name, self.kind, dict(self.attrs), dict(self.tensors))

    @property
    def param_count(self) -> int:
        """Trainable values: every tensor of a parametric kind but its buffers."""
        if self.kind not in PARAMETRIC:
            return 0
        buffers = buffer_names(self.kind, self.attrs)
        return sum(t.numel() for k, t in self.tensors.items() if k not in buffers)


class NetGraph:
    """A neural network as a DAG of layers, with one input node and one output node per head."""

    def __init__(self) -> None:
        self._g = nx.MultiDiGraph()
        self._version = 0  # bumped by every change of structure (nodes, edges)
        self._cache: dict[str, Any] = {}
        self._cache_key: tuple[int, int] | None = None

    def _structure(self) -> dict[str, Any]:
        """Answers that depend on the structure alone (the topological order, each node's
        inputs), computed once per structure: search rollouts ask for them thousands of times.
        Keyed by the change counter (and the node count); `validate` recomputes them, so even
        an edge added through `nx` directly is checked."""
        key = (getattr(self, "_version", 0), self._g.number_of_nodes())
        if getattr(self, "_cache_key", None) != key:
            self._cache, self._cache_key = {}, key
        return self._cache

    def _changed(self) -> None:
        self._version = getattr(self, "_version", 0) + 1

    # ---- construction -------------------------------------------------------------------
    def add(
        self,
        name: str,
        kind: str,
        inputs: Iterable[str] = (),
        tensors: dict[str, torch.Tensor] | None = None,
        **attrs: Any,
    ) -> str:
        """Add a node fed by `inputs` (in order); fills sizes from input shapes and, for
        parametric kinds without `tensors`, initialises weights as torch would."""
        inputs = list(inputs)
        shapes = [self.shape(s) if s in self._g else () for s in inputs]  # add_known checks
        return self.add_known(name, kind, inputs, shapes, tensors, attrs)

    def add_known(self, name: str, kind: str, inputs: list[str], in_shapes: list[Shape],
                  tensors: dict[str, torch.Tensor] | None, attrs: Attrs) -> str:
        """`add`, given the inputs' shapes: a builder that tracks shapes itself (the importer)
        adds each node in constant time instead of walking its ancestors."""
        self._check_new_name(name)
        spec = _kind(name, kind)
        lo, hi = spec.arity
        if len(inputs) < lo or (hi >= 0 and len(inputs) > hi):
            raise GraphError(
                f"node {name!r} ({kind}) takes {lo}..{'n' if hi < 0 else hi} inputs, "
                f"got {len(inputs)}: {inputs}"
            )
        for src in inputs:
            if src not in self._g:
                raise GraphError(f"node {name!r} reads from {src!r}, which is not in the graph")
            if self.node(src).kind == "output":
                raise GraphError(f"node {name!r} reads from output node {src!r}; read its source")
        attrs = complete_attrs(kind, attrs, in_shapes)
        spec.infer(name, attrs, in_shapes)  # raises ShapeError naming the node
        if tensors is None and kind in PARAMETRIC:
            tensors = {k: v.clone() for k, v in build_module(kind, attrs).state_dict().items()}
        self._changed()
        self._g.add_node(name, node=Node(name, kind, attrs, dict(tensors or {})))
        for port, src in enumerate(inputs):
            self._g.add_edge(src, name, port=port)
        return name

    def add_input(self, name: str, shape: Iterable[int]) -> str:
        return self.add(name, "input", shape=[int(s) for s in shape])

    def add_output(self, name: str, source: str) -> str:
        """A named output head (one per task in multi-head networks)."""
        return self.add(name, "output", [source])

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not _NAME.match(name) or keyword.iskeyword(name):
            raise GraphError(
                f"node name {name!r} must be a Python identifier (letters, digits, underscore)"
            )
        if name in _RESERVED:
            raise GraphError(f"node name {name!r} clashes with a torch.nn.Module attribute")
        if name in self._g:
            raise GraphError(f"node {name!r} already exists; pick another name")

    def remove(self, name: str) -> None:
        """Remove a node; its consumers must be rewired by the caller."""
        self._require(name)
        self._changed()
        self._g.remove_node(name)

    def rewire(self, consumer: str, old: str, new: str) -> None:
        """Make `consumer` read `new` where it read `old`, keeping the port."""
        self._require(new)
        edges = [(k, d["port"]) for src, _, k, d in self._g.in_edges(consumer, keys=True,
                                                                      data=True) if src == old]
        if not edges:
            raise GraphError(f"node {consumer!r} does not read from {old!r}")
        self._changed()
        for key, port in edges:
            self._g.remove_edge(old, consumer, key)
            self._g.add_edge(new, consumer, port=port)

    def copy(self) -> NetGraph:
        """A new graph with copied nodes; tensors are shared (they are never written in place)."""
        out = NetGraph()
        for n in self._g.nodes:
            out._g.add_node(n, node=self.node(n).copy())
        out._g.add_edges_from(self._g.edges(keys=True, data=True))
        return out

    # ---- queries --------------------------------------------------------------------------
    def _require(self, name: str) -> None:
        if name not in self._g:
            near = [n for n in self._g.nodes if name.lower() in n.lower()][:5]
            hint = f"; similar names: {near}" if near else ""
            raise GraphError(f"no node named {name!r} in the graph{hint}")

    def node(self, name: str) -> Node:
        self._require(name)
        return self._g.nodes[name]["node"]

    def __contains__(self, name: object) -> bool:
        return name in self._g

    def __len__(self) -> int:
        return self._g.number_of_nodes()

    def __iter__(self) -> Iterator[str]:
        return iter(self.topo_order())

    @property
    def nx(self) -> nx.MultiDiGraph:
        """The underlying networkx graph (read it; change the graph through NetGraph)."""
        return self._g

    def inputs(self, name: str) -> list[str]:
        """The node's inputs in port order."""
        cache = self._structure()
        table = cache.get("inputs")
        if table is None:
            table = {n: [] for n in self._g.nodes}
            for src, dst, _port in sorted(self._g.edges(data="port"), key=lambda e: e[2]):
                table[dst].append(src)
            cache["inputs"] = table
        if name not in table:
            self._require(name)
        return list(table[name])

    def consumers(self, name: str) -> list[str]:
        self._require(name)
        return sorted(set(self._g.successors(name)))

    def topo_order(self) -> list[str]:
        cache = self._structure()
        if "topo" in cache:
            return list(cache["topo"])
        try:
            cache["topo"] = tuple(nx.lexicographical_topological_sort(self._g))
            return list(cache["topo"])
        except nx.NetworkXUnfeasible:
            cycle = nx.find_cycle(self._g)
            path = " -> ".join(e[0] for e in cycle) + f" -> {cycle[0][0]}"
            raise GraphError(f"the graph has a cycle: {path}; remove one of these edges") from None

    def input_nodes(self) -> list[str]:
        return [n for n in self.topo_order() if self.node(n).kind == "input"]

    def input_node(self) -> str:
        found = self.input_nodes()
        if len(found) != 1:
            raise GraphError(f"the graph needs exactly one input node, found {found}")
        return found[0]

    @property
    def heads(self) -> list[str]:
        """Output node names, in insertion order (the order heads were added)."""
        return [n for n in self._g.nodes if self.node(n).kind == "output"]

    def shapes(self) -> dict[str, Shape]:
        """Per-sample output shape of every node, checked against every node's attrs."""
        out: dict[str, Shape] = {}
        for name in self.topo_order():
            node = self.node(name)
            out[name] = kind_of(node.kind).infer(name, node.attrs, [out[i] for i in
                                                                   self.inputs(name)])
        return out

    def shape(self, name: str) -> Shape:
        """Output shape of one node (walks only its ancestors, depth first)."""
        self._require(name)
        out: dict[str, Shape] = {}
        stack: list[tuple[str, bool]] = [(name, False)]
        on_path: set[str] = set()
        while stack:
            n, inputs_done = stack.pop()
            if inputs_done:
                on_path.discard(n)
                node = self.node(n)
                out[n] = kind_of(node.kind).infer(n, node.attrs, [out[i] for i in self.inputs(n)])
                continue
            if n in out:
                continue
            if n in on_path:
                self.topo_order()  # raises a GraphError naming the cycle
            on_path.add(n)
            stack.append((n, True))
            stack.extend((i, False) for i in self.inputs(n) if i not in out)
        return out[name]

    def param_count(self, name: str | None = None) -> int:
        """Trainable parameters of one node, or of the whole graph."""
        if name is not None:
            return self.node(name).param_count
        return sum(self.node(n).param_count for n in self._g.nodes)

    def ancestors(self, names: Iterable[str]) -> set[str]:
        """`names` and every node they read from, directly or not."""
        keep: set[str] = set()
        stack = list(names)
        while stack:
            n = stack.pop()
            if n not in keep:
                keep.add(n)
                stack.extend(self.inputs(n))
        return keep

    def trunk_nodes(self) -> list[str]:
        """Nodes that feed more than one head, or all nodes of a single-head graph."""
        heads = self.heads
        if len(heads) <= 1:
            return self.topo_order()
        feeds = [self.ancestors([h]) for h in heads]
        return [n for n in self.topo_order() if sum(n in a for a in feeds) > 1]

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor, keyed `node.tensor` (the compiled module's state_dict keys)."""
        return {f"{n}.{k}": t for n in self.topo_order() for k, t in self.node(n).tensors.items()}

    # ---- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        """Raise GraphError/ShapeError naming the first offending node; return None if sound."""
        self._changed()  # check the structure as it is now, not as last computed
        order = self.topo_order()  # cycles
        if not self.input_nodes():
            raise GraphError("the graph has no input node; add one with add_input(name, shape)")
        if not self.heads:
            raise GraphError("the graph has no output node; add one with add_output(name, src)")
        for name in order:
            node = self.node(name)
            lo, hi = _kind(name, node.kind).arity
            n_in = len(self.inputs(name))
            if n_in < lo or (hi >= 0 and n_in > hi):
                raise GraphError(
                    f"node {name!r} ({node.kind}) has {n_in} inputs but needs "
                    f"{lo}..{'n' if hi < 0 else hi}: a dangling or missing input"
                )
            if node.kind != "output" and not self.consumers(name):
                raise GraphError(
                    f"node {name!r} ({node.kind}) feeds nothing: connect it or remove it"
                )
        self.shapes()  # shape mismatches
        for name in order:
            self._check_tensors(self.node(name))

    def _check_tensors(self, node: Node) -> None:
        if node.kind not in PARAMETRIC:
            return
        with torch.device("meta"):  # shapes only: no memory, no random init
            layer = build_module(node.kind, node.attrs)
        want = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
        have = {k: tuple(v.shape) for k, v in node.tensors.items()}
        if set(want) != set(have):
            raise GraphError(
                f"node {node.name!r} ({node.kind}) should hold tensors {sorted(want)} "
                f"but holds {sorted(have)}"
            )
        for k, shp in want.items():
            if have[k] != shp:
                raise ShapeError(
                    f"node {node.name!r}: tensor {k!r} has shape {have[k]}, expected {shp} "
                    f"from its attrs {node.attrs}"
                )

    # ---- presentation -------------------------------------------------------------------
    def summary(self) -> str:
        """A table of nodes: name, kind, inputs, output shape, parameters."""
        shapes = self.shapes()
        rows = [("node", "kind", "inputs", "output shape", "params")]
        for n in self.topo_order():
            node = self.node(n)
            rows.append((n, node.kind, ", ".join(self.inputs(n)) or "-",
                         "x".join(map(str, shapes[n])), f"{node.param_count:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        line = "  ".join("-" * w for w in widths)
        fmt = [("  ".join(c.ljust(w) if i < 4 else c.rjust(w)
                          for i, (c, w) in enumerate(zip(r, widths)))) for r in rows]
        total = f"total parameters: {self.param_count():,} in {len(self)} nodes"
        return "\n".join([fmt[0], line, *fmt[1:], line, total])

    def __repr__(self) -> str:
        return f"NetGraph({len(self)} nodes, {self.param_count():,} params, heads={self.heads})"

    # ---- (de)serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Structure only (no tensors), JSON-ready."""
        nodes = [
            {"name": n, "kind": self.node(n).kind, "inputs": self.inputs(n),
             "attrs": _jsonable(self.node(n).attrs)}
            for n in self.topo_order()
        ]
        return {"format": "growth.netgraph", "version": FORMAT_VERSION, "nodes": nodes}

    @classmethod
    def from_dict(cls, data: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None
                  ) -> NetGraph:
        """Rebuild a graph; `tensors` keyed `node.tensor`, or fresh weights if None."""
        if data.get("format") != "growth.netgraph":
            raise GraphError("not a NetGraph structure (missing format: growth.netgraph)")
        if data.get("version", 0) > FORMAT_VERSION:
            raise GraphError(f"structure version {data['version']} is newer than this engine")
        g = cls()
        for item in data["nodes"]:
            name = item["name"]
            own = None
            if tensors is not None and item["kind"] in PARAMETRIC:
                prefix = f"{name}."
                own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            g.add(name, item["kind"], item.get("inputs", []), tensors=own, **item["attrs"])
        return g

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write `structure.json` and `weights.safetensors` into folder `path` (atomically)."""
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in self.named_tensors().items()}
        atomic_write(folder / "weights.safetensors", lambda p: save_file(tensors, str(p)))
        text = json.dumps(self.to_dict(), indent=1)
        atomic_write(folder / "structure.json", lambda p: Path(p).write_text(text))
        return folder

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NetGraph:
        """Read a folder written by `save`; corrupt or mismatched files raise CheckpointError."""
        folder = Path(path)
        structure = folder / "structure.json"
        try:
            data = json.loads(structure.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{structure} is missing; was the graph saved here?") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{structure} is not valid JSON ({exc}); the file is corrupt"
                                  ) from None
        tensors = load_tensors(folder / "weights.safetensors")
        try:
            g = cls.from_dict(data, tensors)
            g._check_weight_keys(tensors)
            g.validate()
        except (GraphError, CheckpointError, KeyError, TypeError, AttributeError, ValueError
                ) as exc:
            raise CheckpointError(
                f"{folder / 'weights.safetensors'} does not match {structure}: {exc}") from None
        return g

    def _check_weight_keys(self, tensors: dict[str, torch.Tensor]) -> None:
        extra = sorted(set(tensors) - set(self.named_tensors()))
        if extra:
            raise CheckpointError(f"weights for nodes not in the structure: {extra[:5]}")


def _kind(node: str, kind: str) -> Kind:
    """kind_of, with the node named in the error."""
    try:
        return kind_of(kind)
    except GraphError as exc:
        raise GraphError(f"node {node!r}: {exc}") from None


def _jsonable(attrs: Attrs) -> Attrs:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.items()}


def output_scale(t: torch.Tensor) -> float:
    """The scale used for relative function-preservation errors: max |value|, at least 1e-12."""
    return max(float(t.abs().max()), 1e-12) if t.numel() else 1.0


__all__ = ["NetGraph", "Node", "ShapeError", "output_scale"]
