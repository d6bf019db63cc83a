"""Learn to Grow (Li, Zhou, Wu, Socher & Xiong, ICML 2019): per task and layer, a
differentiable choice among reusing, adapting or replacing each existing version of the layer.

The network keeps versions of every trunk layer (a linear or conv layer with the BatchNorm after
it, if any); version 0 is the base trunk, which task 0 trains. Each later task k searches its
path: for every layer l with S_l versions the options are
    reuse v   (version v, frozen),
    adapt v   (version v, frozen, plus a small adapter added to its output: a 1x1 convolution
               for a convolution, a linear bottleneck of ceil(out / adapter_reduction) units for
               a linear layer, zero-initialised; BatchNorm after it is the task's own copy),
    new       (a fresh layer, with a fresh BatchNorm),
2 S_l + 1 in all. The choice is relaxed to a softmax: layer l outputs
    sum_c softmax(beta_l)_c o_c(x_{l-1}),
every option reading the mixture below it, in a supernet built for the search (a graph with
one `scale` node per option, holding softmax(beta_l)_c, and an `add`). The one loop trains the
supernet's new weights on the task's training batches (`search_epochs`), and after every step
the architecture weights beta take one Adam step (`arch_lr`) on a batch of the task's
validation split (its training split when it has none), with the loss
    CE + complexity * sum_l sum_c softmax(beta_l)_c cost_{l,c},
cost = the option's new parameters over the layer's (reuse 0, adapt small, new 1); beta's
gradient goes through the softmax exactly: J^T dL/ds. Then each layer takes its argmax, the
chosen structure is built into the network (its new and adapted layers starting from the
supernet's values) with the task's head moved onto it, and the campaign's training fine-tunes
it. Everything earlier tasks' heads read is frozen first, so their outputs stay bitwise
identical.

The graph has no weight sharing between nodes: a version reused on an input other than the
one it was built on is a frozen copy of it (its tensors equal the version's at all times, since
both are frozen). The size report counts each version once, as a deployment that shares the
weights would store it. The paths, versions and search records are in `extra`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from growth.data.sampling import generator
from growth.errors import ConfigError
from growth.graph import NetGraph
from growth.layers import FROZEN
from growth.model import Model
from growth.ops.channels import PRODUCERS
from growth.ops.columns import base_column, freeze
from growth.ops.registry import ChangeRecord
from growth.strategies.base import Context, Strategy, StrategyParams

SEARCH = "search"  # the supernet's output
OPTIONS = ("reuse", "adapt", "new")


class LtGParams(StrategyParams):
    """Learn to Grow settings.

    search_epochs: the supernet's training per task. arch_lr: Adam's learning rate for the
    architecture weights. complexity: weight of the expected new parameters (as a fraction of
    each layer's) in the architecture loss. adapter_reduction: a linear adapter's bottleneck
    is ceil(out_features / adapter_reduction) units.
    """

    trunk: str = Field("features", min_length=1, description="the node every head reads")
    search_epochs: int = Field(5, ge=1, description="supernet epochs per task")
    arch_lr: float = Field(3e-3, gt=0, description="architecture weights' learning rate (Adam)")
    complexity: float = Field(0.01, ge=0, description="weight of the new-parameter cost")
    adapter_reduction: float = Field(8.0, ge=1,
                                     description="linear adapter width = out_features / this")


def option_names(versions: int) -> list[tuple[str, int | None]]:
    """The options of a layer with `versions` versions, in beta's order."""
    return [*(("reuse", v) for v in range(versions)), *(("adapt", v) for v in range(versions)),
            ("new", None)]


def mixture_weights(beta: Tensor) -> Tensor:
    """The relaxation: softmax over a layer's options."""
    return F.softmax(beta, dim=0)


class Relaxation(Strategy):
    """The architecture search as hooks on the one loop: softmax(beta) written into the
    supernet's scale nodes, and one step of beta on a validation batch after every step of the
    weights (first-order alternation)."""

    name = "ltg_relaxation"

    def __init__(self, scales: dict[str, list[str]], costs: dict[str, Tensor],
                 complexity: float, lr: float, val: tuple[Tensor, Tensor], batch: int,
                 gen: torch.Generator) -> None:
        super().__init__()
        self.scales, self.costs, self.complexity = scales, costs, complexity
        self.beta = {n: torch.zeros(len(s), requires_grad=True) for n, s in scales.items()}
        self.opt = torch.optim.Adam(list(self.beta.values()), lr=lr)
        self.val, self.batch, self.gen = val, batch, gen

    @contextmanager
    def training(self, ctx: Context) -> Iterator[None]:
        self.write(ctx)
        yield

    @torch.no_grad()
    def write(self, ctx: Context) -> None:
        """softmax(beta_l) into layer l's scale nodes."""
        params = ctx.model.named_parameters()
        for layer, names in self.scales.items():
            for name, w in zip(names, mixture_weights(self.beta[layer].detach())):
                params[f"{name}.weight"].fill_(float(w))

    def after_step(self, ctx: Context) -> None:
        params = ctx.model.named_parameters()
        for names in self.scales.values():  # the weights' step left gradients there
            for n in names:
                params[f"{n}.weight"].grad = None
        x, y = self.val
        idx = torch.randperm(len(y), generator=self.gen)[:self.batch].to(y.device)
        self.arch_step(ctx, x[idx], y[idx])

    def arch_step(self, ctx: Context, x: Tensor, y: Tensor) -> None:
        """One Adam step of beta on a batch (see `gradient`), then the new weights written."""
        grads = self.gradient(ctx, x, y)
        for layer, beta in self.beta.items():
            beta.grad = grads[layer]
        self.opt.step()
        self.write(ctx)

    def gradient(self, ctx: Context, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """d/d beta of CE(batch) + complexity * expected cost, through the softmax: J^T g with
        g the loss's gradient with respect to the mixture weights, plus complexity * J^T
        cost."""
        params = ctx.model.named_parameters()
        names = [f"{n}.weight" for layer in self.scales for n in self.scales[layer]]
        loss = F.cross_entropy(ctx.model.head(SEARCH)(x), y)
        grads = dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names])))
        out = {}
        for layer, scale in self.scales.items():
            beta = self.beta[layer].detach().requires_grad_(True)
            s = mixture_weights(beta)
            g = torch.stack([grads[f"{n}.weight"].sum() for n in scale]).detach().cpu()
            total = (s * g).sum() + self.complexity * (s * self.costs[layer]).sum()
            out[layer] = torch.autograd.grad(total, beta)[0]
        return out

    def choice(self) -> dict[str, int]:
        """Each layer's argmax option (ties: the earlier option, reuse before adapt before
        new)."""
        return {layer: int(torch.argmax(b.detach())) for layer, b in self.beta.items()}


class LearnToGrow(Strategy):
    name = "learn_to_grow"
    description = "learn to grow: per task and layer a differentiable choice among reuse, " \
                  "adapt and new (softmax relaxation), then the chosen path fine-tuned"
    Params = LtGParams
    params: LtGParams
    scenarios: ClassVar[tuple[str, ...]] = ("task",)

    # ---- the trunk's template ------------------------------------------------------------------
    def template(self, graph: NetGraph) -> list[str]:
        """The base trunk in order, checked to be a chain (each node reads the one before)."""
        trunk = self.params.trunk
        if trunk not in graph:
            raise ConfigError(f"strategy.trunk: the graph has no node {trunk!r}; name the node "
                              "the heads read (e.g. 'features')")
        nodes = base_column(graph, trunk)
        previous = graph.inputs(nodes[0])
        for n in nodes:
            node = graph.node(n)
            if graph.inputs(n) != previous or len(previous) != 1:
                raise ConfigError(f"strategy learn_to_grow needs a chain trunk (each layer "
                                  f"reads the one before), but {n!r} reads {graph.inputs(n)}")
            if node.tensors and node.kind not in PRODUCERS and not node.kind.startswith(
                    "batchnorm"):
                raise ConfigError(f"strategy learn_to_grow: trunk node {n!r} ({node.kind}) "
                                  "holds tensors but is neither a layer nor a BatchNorm")
            if node.kind in PRODUCERS and node.attrs.get("groups", 1) != 1:
                raise ConfigError(f"strategy learn_to_grow: {n!r} is a grouped convolution; "
                                  "only dense layers can be searched")
            previous = [n]
        return nodes

    def layers(self, graph: NetGraph) -> dict[str, str | None]:
        """Searchable layer -> the BatchNorm right after it (or None)."""
        nodes = self.template(graph)
        out: dict[str, str | None] = {}
        for i, n in enumerate(nodes):
            if graph.node(n).kind in PRODUCERS:
                after = nodes[i + 1] if i + 1 < len(nodes) else None
                bn = after if after and graph.node(after).kind.startswith("batchnorm") else None
                out[n] = bn
        return out

    def _record(self) -> dict[str, Any]:
        return self.extra.setdefault("ltg", {"versions": {}, "origin": {}, "paths": {},
                                             "search": {}})

    def _base(self, graph: NetGraph) -> None:
        """Version 0 of every layer is the base trunk (task 0's path)."""
        rec = self._record()
        if rec["versions"]:
            return
        layers = self.layers(graph)
        bns = {b for b in layers.values() if b}
        for n in self.template(graph):
            if n in layers:
                rec["versions"][n] = [{"node": n, "bn": layers[n], "task": 0}]
                rec["origin"][n] = [n, 0, "version"]
            elif n in bns:
                rec["origin"][n] = [n, 0, "version"]
            else:
                rec["origin"][n] = [n, None, "stateless"]

    # ---- hooks ---------------------------------------------------------------------------
    def before_task(self, ctx: Context) -> None:
        head = ctx.head_of(ctx.task)
        seen = [ctx.head_of(t) for t in ctx.seen]
        if head in seen:
            raise ConfigError(f"strategy learn_to_grow needs one head per task, but task "
                              f"{ctx.task.name!r} shares head {head!r}; use scenario: task")
        graph = ctx.model.graph
        self._base(graph)
        rec = self._record()
        if not seen:
            rec["paths"]["0"] = {n: ["reuse", 0] for n in self.layers(graph)}
            return
        frozen = freeze(graph, graph.ancestors(seen) - set(graph.input_nodes()))
        start = time.perf_counter()
        net, relax = self.search(ctx, frozen.graph)
        seconds = time.perf_counter() - start
        picks = relax.choice()
        choices = {n: list(option_names(len(rec["versions"][n]))[picks[n]])
                   for n in relax.beta}
        grown, record = self.grow(frozen.graph, net, ctx, choices)
        ctx.replace_graph(grown, [frozen.record, record])
        rec["paths"][str(ctx.task.index)] = choices
        rec["search"][str(ctx.task.index)] = {
            "seconds": seconds, "options": {n: len(b) for n, b in relax.beta.items()},
            "architectures": math.prod(len(b) for b in relax.beta.values()),
            "weights": {n: [round(float(w), 6) for w in mixture_weights(b.detach())]
                        for n, b in relax.beta.items()}}

    # ---- the search ------------------------------------------------------------------------
    def supernet(self, graph: NetGraph, head: str, seed: int
                 ) -> tuple[NetGraph, dict[str, list[str]], dict[str, Tensor]]:
        """The relaxed network for a task whose head is `head`: per layer, every option reads
        the mixture below and is scaled by its weight (a `scale` node) into an `add`. Returns
        (supernet, scale nodes per layer, cost per option per layer)."""
        rec = self._record()
        layers = self.layers(graph)
        bns = {b for b in layers.values() if b}
        nodes = self.template(graph)
        net = NetGraph()
        source = graph.inputs(nodes[0])[0]
        cur = net.add_input(source, graph.shape(source))
        scales: dict[str, list[str]] = {}
        costs: dict[str, Tensor] = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            for n in nodes:
                if n in bns:
                    continue
                spec = graph.node(n)
                if n not in layers:
                    cur = net.add(f"s_{n}", spec.kind, [cur], **_attrs(spec.attrs))
                    continue
                outs, cost = [], []
                size = graph.param_count(n) + (graph.param_count(layers[n]) if layers[n] else 0)
                for option, v in option_names(len(rec["versions"][n])):
                    stem = f"s_{n}_{option}" + ("" if v is None else str(v))
                    out, added = _option(net, graph, option, rec["versions"][n][v]
                                         if v is not None else None, n, layers[n], stem, cur,
                                         self.params.adapter_reduction)
                    outs.append(out)
                    cost.append(added / max(size, 1))
                weights = [net.add(f"s_{n}_w{c}", "scale", [o], init=1.0 / len(outs))
                           for c, o in enumerate(outs)]
                cur = net.add(f"s_{n}_mix", "add", weights)
                scales[n] = weights
                costs[n] = torch.tensor(cost)
            layer = graph.inputs(head)[0]
            spec = graph.node(layer)
            net.add("s_head", spec.kind, [cur], tensors=dict(spec.tensors), **_attrs(spec.attrs))
            net.add_output(SEARCH, "s_head")
        return net, scales, costs

    def search(self, ctx: Context, graph: NetGraph) -> tuple[NetGraph, Relaxation]:
        """Train the supernet on the task with the one loop; returns the trained supernet
        and the relaxation (its beta)."""
        from growth.train import fit  # the loop imports strategies: import late

        head = ctx.head_of(ctx.task)
        net, scales, costs = self.supernet(graph, head, ctx.seed)
        model = Model(net, ctx.device)
        sctx = Context(model, ctx.task, [], lambda t: SEARCH, ctx.label_of, ctx.device,
                       seed=ctx.seed)
        x, y = ctx.task.val if len(ctx.task.val[1]) else ctx.task.train
        val = (x.to(ctx.device), ctx.label_of(ctx.task, y).to(ctx.device))
        relax = Relaxation(scales, costs, self.params.complexity, self.params.arch_lr, val,
                           ctx.train_config.batch_size, generator(ctx.seed, "ltg-arch"))
        skip = {f"{n}.weight" for names in scales.values() for n in names}
        params = [p for n, p in model.named_parameters().items()
                  if n not in skip and p.requires_grad]
        fit(sctx, relax, ctx.train_config, seed=ctx.seed, epochs=self.params.search_epochs,
            params=params)
        return model.graph, relax

    # ---- the chosen path ---------------------------------------------------------------------
    def grow(self, graph: NetGraph, net: NetGraph, ctx: Context,
             choices: dict[str, list[Any]]) -> tuple[NetGraph, ChangeRecord]:
        """Build the chosen path into `graph` (sharing every node an earlier path already
        computes on the same input), take the supernet's trained values for its new layers,
        adapters and head, and move the task's head onto it."""
        rec = self._record()
        k = ctx.task.index
        layers = self.layers(graph)
        bns = {b for b in layers.values() if b}
        out = graph.copy()
        added: list[str] = []

        def make(name: str, kind: str, inputs: list[str], attrs: dict[str, Any],
                 origin: list[Any], tensors: dict[str, Tensor] | None = None,
                 frozen: bool = False) -> str:
            out.add(name, kind, inputs, tensors=tensors,
                    **{**_attrs(attrs), **({FROZEN: True} if frozen else {})})
            rec["origin"][name] = origin
            added.append(name)
            return name

        def shared(source: str, template: str, version: int | None,
                   roles: tuple[str, ...]) -> str | None:
            for c in out.consumers(source):
                o = rec["origin"].get(c)
                if o and o[0] == template and o[1] == version and o[2] in roles:
                    return c
            return None

        def reused(source: str, template: str, version: int, node: str) -> str:
            """Version `version` of `template` applied to `source`: the node an earlier path
            has for it, or a frozen copy."""
            spec = out.node(node)
            return shared(source, template, version, ("version", "copy")) or make(
                f"g{k}_{template}", spec.kind, [source], spec.attrs,
                [template, version, "copy"], dict(spec.tensors), frozen=True)

        def trained(name: str, stem: str, inputs: list[str], origin: list[Any]) -> str:
            spec = net.node(stem)
            return make(name, spec.kind, inputs, spec.attrs, origin,
                        dict(spec.tensors) or None)

        cur = graph.inputs(self.template(graph)[0])[0]
        for n in self.template(graph):
            if n in bns:
                continue
            if n not in layers:
                spec = graph.node(n)
                cur = shared(cur, n, None, ("stateless",)) or make(
                    f"g{k}_{n}", spec.kind, [cur], spec.attrs, [n, None, "stateless"])
                continue
            option, v = choices[n]
            bn = layers[n]
            stem = f"s_{n}_{option}" + ("" if v is None else str(v))
            if option == "reuse":
                ver = rec["versions"][n][v]
                cur = reused(cur, n, v, ver["node"])
                if bn:
                    cur = reused(cur, bn, v, ver["bn"])
                continue
            if option == "adapt":
                own = [n, None, f"adapt{k}"]
                base = reused(cur, n, v, rec["versions"][n][v]["node"])
                first = f"{stem}_v" if f"{stem}_v" in net else f"{stem}_u"
                top = trained(f"g{k}_{n}_{first.rsplit('_', 1)[1]}", first, [cur], own)
                if first.endswith("_v"):
                    top = trained(f"g{k}_{n}_u", f"{stem}_u", [top], own)
                cur = make(f"g{k}_{n}_sum", "add", [base, top], {}, own)
            else:
                version = len(rec["versions"][n])
                cur = trained(f"g{k}_{n}", stem, [cur], [n, version, "version"])
                rec["versions"][n].append({"node": cur, "bn": None, "task": k})
            if bn:
                role = [bn, None, f"adapt{k}"] if option == "adapt" else \
                    [bn, len(rec["versions"][n]) - 1, "version"]
                cur = trained(f"g{k}_{bn}", f"{stem}_bn", [cur], role)
                if option == "new":
                    rec["versions"][n][-1]["bn"] = cur
        head = ctx.head_of(ctx.task)
        layer = out.inputs(head)[0]
        out.rewire(layer, out.inputs(layer)[0], cur)
        out.node(layer).tensors = dict(net.node("s_head").tensors)
        tensors = [f"{n}.{t}" for n in added for t in out.node(n).tensors]
        return out, ChangeRecord("learn_to_grow_path", {"task": k, "choices": choices},
                                 added=tensors, added_nodes=added)

    # ---- reports and size ------------------------------------------------------------------
    def run_report(self) -> dict[str, Any]:
        searches = self._record()["search"] if "ltg" in self.extra else {}
        return {"search": {"children": len(searches),
                           "child_time_s": sum(float(s["seconds"]) for s in searches.values()),
                           "architectures": sum(int(s["architectures"])
                                                for s in searches.values())},
                "details": {"learn_to_grow": {"paths": self.extra.get("ltg", {}).get("paths", {}),
                                              "search": searches}}}

    def size_parts(self, model: Model) -> dict[str, list[Any]]:
        """"trunk": every layer version (and the nodes paths share), each once; "adapters":
        the tasks' adapters and their BatchNorms; "heads". Frozen copies of a version reused
        on another input are not counted: they are the version's weights again."""
        params = model.named_parameters()
        origin = self.extra.get("ltg", {}).get("origin", {})
        graph = model.graph
        heads = {n for h in graph.heads for n in graph.inputs(h)}
        parts: dict[str, list[Any]] = {"trunk": [], "adapters": [], "heads": []}
        for name in graph.topo_order():
            o = origin.get(name)
            if o is not None and o[2] == "copy":
                continue
            part = "heads" if name in heads else "adapters" if o is not None and \
                str(o[2]).startswith("adapt") else "trunk"
            parts[part] += [params[f"{name}.{t}"] for t in graph.node(name).tensors
                            if f"{name}.{t}" in params]
        return parts


def _attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """A node's attributes without the frozen mark and the sizes its input decides."""
    drop = {FROZEN, "in_features", "in_channels", "num_features"}
    return {k: v for k, v in attrs.items() if k not in drop}


def _option(net: NetGraph, graph: NetGraph, option: str, version: dict[str, Any] | None,
            layer: str, bn: str | None, stem: str, cur: str, reduction: float
            ) -> tuple[str, int]:
    """Add one option of `layer` reading `cur` to the supernet; returns (its output node, the
    parameters it adds)."""
    spec = graph.node(layer)
    if option == "new":
        out = net.add(stem, spec.kind, [cur], **_attrs(spec.attrs))
        added = net.param_count(out)
        if bn:
            out = net.add(f"{stem}_bn", graph.node(bn).kind, [out], **_attrs(graph.node(bn).attrs))
            added += net.param_count(out)
        return out, added
    base = net.add(stem, spec.kind, [cur], tensors=dict(graph.node(version["node"]).tensors),
                   **{**_attrs(spec.attrs), FROZEN: True})
    if option == "reuse":
        if bn:
            ver_bn = graph.node(version["bn"])
            base = net.add(f"{stem}_bn", ver_bn.kind, [base], tensors=dict(ver_bn.tensors),
                           **{**_attrs(ver_bn.attrs), FROZEN: True})
        return base, 0
    added = 0
    if spec.kind == "linear":
        width = max(1, math.ceil(spec.attrs["out_features"] / reduction))
        v = net.add(f"{stem}_v", "linear", [cur], out_features=width, bias=False)
        u = net.add(f"{stem}_u", "linear", [v], out_features=spec.attrs["out_features"],
                    bias=False)
        added += net.param_count(v) + net.param_count(u)
    else:
        u = net.add(f"{stem}_u", "conv2d", [cur], out_channels=spec.attrs["out_channels"],
                    kernel_size=1, stride=spec.attrs["stride"], bias=False)
        added += net.param_count(u)
        if net.shape(u) != net.shape(base):
            raise ConfigError(f"strategy learn_to_grow: a 1x1 adapter of {layer!r} gives "
                              f"{net.shape(u)}, the layer {net.shape(base)}; use same padding")
    node = net.node(u)
    node.tensors = {k: torch.zeros_like(t) for k, t in node.tensors.items()}
    out = net.add(f"{stem}_sum", "add", [base, u])
    if bn:
        ver_bn = graph.node(version["bn"])
        out = net.add(f"{stem}_bn", ver_bn.kind, [out], tensors=dict(ver_bn.tensors),
                      **_attrs(ver_bn.attrs))
        added += net.param_count(out)
    return out, added


__all__ = ["LearnToGrow", "LtGParams", "Relaxation", "mixture_weights", "option_names"]
