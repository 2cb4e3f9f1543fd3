"""Lowering: ops that only ONNX Runtime runs, rewritten as standard ONNX ops that every backend can build.

scikit-learn exports (skl2onnx) compute with `ai.onnx.ml` ops, and models saved after ONNX Runtime's graph
optimisation carry its `com.microsoft` fusions; OpenVINO, onnx2tf, TVM and ORT's int8 quantizer have nothing for
either. Each rewrite reproduces what ONNX Runtime computes for one op family (binary-case quirks included) from
standard ops at opset >= 13, or raises Unsupported for what it does not reproduce, leaving that node as it is.
`LOWERINGS` maps (domain, op type) to its rewrite: adding an op is adding a function. Intake
(`edgekit.compile.intake._lower`) runs each lowering against the original on ONNX Runtime before keeping it.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

MIN_OPSET = 13  # ReduceSum's axes input, Softmax over one axis, Clip's min/max inputs
ML, MS = "ai.onnx.ml", "com.microsoft"
FLOAT, INT64, DOUBLE, STRING, BOOL, FLOAT16 = 1, 7, 11, 8, 9, 10  # onnx.TensorProto element types
INTEGERS = {2, 3, 4, 5, 6, 7, 12, 13}
MAX_TREE_DEPTH = 64
MAX_UNROLLED_STEPS = 64  # a recurrent layer over more time steps is left as it is
LSTM_ACTIVATIONS = ["Sigmoid", "Tanh", "Tanh"]  # ONNX's default: gates, cell input, output
Dims = tuple[int | None, ...] | None
# Tree node modes: the comparison that sends a sample down the true branch.
BRANCHES = {
    "BRANCH_LEQ": "LessOrEqual",
    "BRANCH_LT": "Less",
    "BRANCH_GTE": "GreaterOrEqual",
    "BRANCH_GT": "Greater",
    "BRANCH_EQ": "Equal",
    "BRANCH_NEQ": "Equal",  # negated
}
# ONNX Runtime's fused activations (MLAS) and the attributes their parameters are, in order.
ACTIVATIONS = {
    "Relu": (),
    "Tanh": (),
    "Sigmoid": (),
    "LeakyRelu": ("alpha",),
    "HardSigmoid": ("alpha", "beta"),
    "Elu": ("alpha",),
    "Clip": ("min", "max"),
}


class Unsupported(Exception):
    """The node asks for something its rewrite does not reproduce exactly; it stays as it is."""


@dataclass
class Lowered:
    """One op family lowered in a copy of the model."""

    model: object | None  # onnx.ModelProto; None when no node of the family could be lowered
    count: int = 0
    ops: list[str] = field(default_factory=list)  # op types the rewrites wrote, first use first
    nodes: list[str] = field(default_factory=list)  # names of the nodes the rewrites wrote
    skipped: list[str] = field(default_factory=list)  # why nodes were left as they are


class _Builder:
    """Writes one node's replacement: fresh names under the node's name, constants as initializers, and the
    node's outputs bound to the tensors that compute them."""

    def __init__(self, node, opset: int, types: dict[str, tuple[int, Dims]], taken: set[str],
                 initializers: dict) -> None:  # fmt: skip
        self.node = node
        self.opset = opset
        self.types = types  # tensor name → (element type, dims or None)
        self.initializers_in_model = initializers  # name → onnx.TensorProto
        self.taken = taken
        self.prefix = node.name or node.output[0]
        self.nodes: list = []
        self.initializers: list = []
        self.bound: dict[str, str] = {}

    def fresh(self, suffix: str) -> str:
        name, count = f"{self.prefix}/{suffix}", 1
        while name in self.taken:
            name, count = f"{self.prefix}/{suffix}_{count}", count + 1
        self.taken.add(name)
        return name

    def const(self, suffix: str, value) -> str:
        from onnx import numpy_helper

        name = self.fresh(suffix)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str | None = None, **attributes) -> str:
        from onnx import helper

        output = self.fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [output], name or self.fresh(op_type), **attributes))
        return output

    def split(self, x: str, sizes: list[int], axis: int) -> list[str]:
        """Split x into parts of `sizes` along `axis` (sizes as an input, opset 13 on)."""
        from onnx import helper

        parts = [self.fresh(f"part{index}") for index in range(len(sizes))]
        sizes_name = self.const("sizes", np.array(sizes, np.int64))
        self.nodes.append(helper.make_node("Split", [x, sizes_name], parts, self.fresh("Split"), axis=axis))
        return parts

    def axes(self, op_type: str, x: str, axes: list[int]) -> str:
        """Squeeze or Unsqueeze over `axes` (an input from opset 13)."""
        return self.op(op_type, [x, self.const("axes", np.array(axes, np.int64))])

    def reduce(self, op_type: str, x: str, axis: int = -1) -> str:
        """Reduce over one axis, keeping it; ReduceSum takes axes as an input from opset 13, the others from 18."""
        if op_type == "ReduceSum" or self.opset >= 18:
            return self.op(op_type, [x, self.const("axes", np.array([axis], np.int64))], keepdims=1)
        return self.op(op_type, [x], axes=[axis], keepdims=1)

    def float_input(self, name: str, ranks: tuple[int, ...] = (2,), double: bool = True) -> str:
        """The input as float32 (ONNX Runtime's ml kernels cast integers, and doubles where `double`), checked to
        have one of `ranks` ([N, features] for most ml ops)."""
        elem_type, rank = self.typed(name)
        if rank not in ranks:
            raise Unsupported(f"input of rank {'unknown' if rank is None else rank}")
        if elem_type == FLOAT:
            return name
        if elem_type in INTEGERS or (double and elem_type == DOUBLE):
            return self.op("Cast", [name], to=FLOAT)
        raise Unsupported(f"input of element type {elem_type}")

    def constant(self, name: str) -> np.ndarray:
        """The value of an initializer of the model; Unsupported for a computed tensor."""
        from onnx import numpy_helper

        if name not in self.initializers_in_model:
            raise Unsupported(f"computed (not constant) {name}")
        return numpy_helper.to_array(self.initializers_in_model[name])

    def typed(self, name: str) -> tuple[int, int | None]:
        """(element type, rank), 0 and None where unknown."""
        elem_type, dims = self.types.get(name, (0, None))
        return elem_type, None if dims is None else len(dims)

    def output(self, index: int, tensor: str) -> None:
        """Bind the node's output `index` (when the graph uses it) to `tensor`."""
        if index < len(self.node.output) and self.node.output[index]:
            self.bound[tensor if tensor not in self.bound else self.op("Identity", [tensor])] = self.node.output[index]

    def finish(self) -> list:
        """The replacement nodes, writing the node's own output names; a bound tensor the rewrite did not compute
        (a pass-through) is copied by an Identity."""
        produced = {output for node in self.nodes for output in node.output}
        for tensor in [t for t in self.bound if t not in produced]:
            self.bound[self.op("Identity", [tensor])] = self.bound.pop(tensor)
        for node in self.nodes:
            node.input[:] = [self.bound.get(name, name) for name in node.input]
            node.output[:] = [self.bound.get(name, name) for name in node.output]
        return self.nodes


def _attributes(node) -> dict:
    from onnx import helper, numpy_helper

    values = {}
    for attribute in node.attribute:
        value = helper.get_attribute_value(attribute)
        if attribute.type == 4:  # TENSOR (the ml opset 3 `*_as_tensor` attributes)
            if value.data_type == DOUBLE:
                raise Unsupported(f"double-precision attribute {attribute.name}")
            value = numpy_helper.to_array(value).ravel().tolist()
        values[attribute.name] = value.decode() if isinstance(value, bytes) else value
    for name, value in list(values.items()):
        if name.endswith("_as_tensor"):
            values.setdefault(name.removesuffix("_as_tensor"), value)
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            values[name] = [v.decode() for v in value]
    return values


def _int_labels(attributes: dict, key: str) -> np.ndarray:
    if attributes.get("classlabels_strings"):
        raise Unsupported("string class labels")
    return np.array(attributes.get(key, []), np.int64)


def _post_transform(b: _Builder, scores: str, transform: str) -> str:
    """ONNX Runtime's post_transform over the last axis of [N, C>1] scores."""
    if transform == "NONE":
        return scores
    if transform == "LOGISTIC":
        return b.op("Sigmoid", [scores])
    if transform == "SOFTMAX":
        return b.op("Softmax", [scores], axis=-1)
    if transform == "SOFTMAX_ZERO":  # a softmax over the non-zero scores; zeros stay (nearly) zero
        top = b.reduce("ReduceMax", scores)
        nonzero = b.op("Cast", [b.op("Greater", [b.op("Abs", [scores]), b.const("epsilon", np.float32(1e-7))])],
                       to=FLOAT)  # fmt: skip
        exp = b.op("Exp", [b.op("Sub", [scores, top])])
        zero = b.op("Mul", [scores, b.op("Exp", [b.op("Neg", [top])])])
        values = b.op("Where", [b.op("Cast", [nonzero], to=BOOL), exp, zero])
        return b.op("Div", [values, b.reduce("ReduceSum", b.op("Mul", [values, nonzero]))])
    raise Unsupported(f"post_transform {transform}")


def _label_above(b: _Builder, score: str, threshold: float, labels: np.ndarray) -> str:
    """labels[1] where the single score column is above `threshold`, else labels[0]: [N]."""
    flat = b.op("Reshape", [score, b.const("flat", np.array([-1], np.int64))])
    above = b.op("Cast", [b.op("Greater", [flat, b.const("threshold", np.float32(threshold))])], to=INT64)
    return b.op("Gather", [b.const("labels", labels), above])


def _label_of_max(b: _Builder, scores: str, labels: np.ndarray) -> str:
    """The label of each row's highest score, the first one on ties (as ONNX Runtime picks)."""
    return b.op("Gather", [b.const("labels", labels), b.op("ArgMax", [scores], axis=1, keepdims=0)])


def _linear(b: _Builder, x: str, coefficients, intercepts, count: int) -> str:
    """x · coefficientsᵀ + intercepts, for `count` rows of coefficients; [N, count]."""
    weights = np.asarray(coefficients, np.float32)
    if count < 1 or weights.size % count:
        raise Unsupported(f"{weights.size} coefficients for {count} outputs")
    product = b.op("MatMul", [x, b.const("coefficients", weights.reshape(count, -1).T.copy())])
    if intercepts is None:
        return product
    return b.op("Add", [product, b.const("intercepts", np.asarray(intercepts, np.float32))])


def _linear_classifier(node, b: _Builder) -> None:
    """Scores = x · Wᵀ + b. With several score columns the label is the class of the highest; with one (a binary
    model) the label is classlabels[1] where the score s is above 0, and ONNX Runtime writes the probabilities as
    [1 - p, p], p = σ(s) for LOGISTIC and s for the other post_transforms."""
    attributes = _attributes(node)
    labels = _int_labels(attributes, "classlabels_ints")
    transform = attributes.get("post_transform", "NONE")
    intercepts = attributes.get("intercepts", [])
    x = b.float_input(node.input[0])
    scores = _linear(b, x, attributes["coefficients"], intercepts, len(intercepts))
    if len(intercepts) > 1:
        if len(labels) != len(intercepts):
            raise Unsupported(f"{len(labels)} class labels for {len(intercepts)} score columns")
        b.output(0, _label_of_max(b, scores, labels))
        b.output(1, _post_transform(b, scores, transform))
        return
    if transform == "PROBIT" or len(labels) != 2:
        raise Unsupported("a one-column model with PROBIT or without two class labels")
    b.output(0, _label_above(b, scores, 0.0, labels))
    if transform == "LOGISTIC":
        scores = b.op("Sigmoid", [scores])
    b.output(1, b.op("Concat", [b.op("Sub", [b.const("one", np.float32(1)), scores]), scores], axis=1))


def _linear_regressor(node, b: _Builder) -> None:
    """x · Wᵀ + b (intercepts only when there is one per target); ONNX Runtime applies the post_transform only
    across several targets."""
    attributes = _attributes(node)
    targets = attributes.get("targets", 1)
    intercepts = attributes.get("intercepts", [])
    x = b.float_input(node.input[0], double=False)
    values = _linear(b, x, attributes["coefficients"], intercepts if len(intercepts) == targets else None, targets)
    transform = attributes.get("post_transform", "NONE")
    if targets == 1 and transform == "PROBIT":
        raise Unsupported("post_transform PROBIT")
    b.output(0, _post_transform(b, values, transform) if targets > 1 else values)


def _normalizer(node, b: _Builder) -> None:
    """Each row divided by its max, L1 or L2 norm; a row whose norm is 0 stays as it is (the divisor becomes 1)."""
    norm = _attributes(node).get("norm", "MAX")
    x = b.float_input(node.input[0], ranks=(1, 2))
    if norm == "MAX":
        divisor = b.reduce("ReduceMax", x)
    elif norm == "L1":
        divisor = b.reduce("ReduceSum", b.op("Abs", [x]))
    elif norm == "L2":
        divisor = b.op("Sqrt", [b.reduce("ReduceSum", b.op("Mul", [x, x]))])
    else:
        raise Unsupported(f"norm {norm}")
    is_zero = b.op("Cast", [b.op("Equal", [divisor, b.const("zero", np.float32(0))])], to=FLOAT)
    b.output(0, b.op("Div", [x, b.op("Add", [divisor, is_zero])]))


def _scaler(node, b: _Builder) -> None:
    """(x - offset) · scale, per feature or one value for all."""
    attributes = _attributes(node)
    offset = np.asarray(attributes.get("offset", []), np.float32)
    scale = np.asarray(attributes.get("scale", []), np.float32)
    if not scale.size or scale.size != offset.size:
        raise Unsupported(f"{offset.size} offsets for {scale.size} scales")
    x = b.float_input(node.input[0], ranks=(1, 2))
    b.output(0, b.op("Mul", [b.op("Sub", [x, b.const("offset", offset)]), b.const("scale", scale)]))


def _array_feature_extractor(node, b: _Builder) -> None:
    """A Gather on the last axis (skl2onnx's label lookup classes[argmax]); a 1-D X gives [1, n], as in ONNX
    Runtime."""
    data, indices = node.input
    elem_type, rank = b.typed(data)
    if rank is None or rank < 1 or elem_type == STRING:
        raise Unsupported("data of unknown rank" if rank is None else "string or scalar data")
    flat = b.op("Reshape", [indices, b.const("flat", np.array([-1], np.int64))])
    gathered = b.op("Gather", [data, flat], name=b.node.name or None, axis=-1)
    if rank == 1:
        gathered = b.op("Unsqueeze", [gathered, b.const("axes", np.array([0], np.int64))])
    b.output(0, gathered)


@dataclass
class _Ensemble:
    """Tree ensemble attributes as arrays: the split nodes, and each root-to-leaf path as split conditions."""

    features: np.ndarray  # per split node
    thresholds: np.ndarray
    modes: list[str]
    nan_true: np.ndarray  # per split node: a missing value (NaN) takes the true branch
    paths: list[list[tuple[int, bool]]]  # per leaf: (split node, branch taken)
    leaves: dict[tuple[int, int], list[int]]  # (tree id, node id) → the leaves (paths) it is
    trees: int


def _ensemble(attributes: dict) -> _Ensemble:
    """Walk every tree from its root; each leaf becomes one path of (split, branch) conditions."""
    trees, ids = attributes["nodes_treeids"], attributes["nodes_nodeids"]
    modes = attributes["nodes_modes"]
    index = {(tree, node): i for i, (tree, node) in enumerate(zip(trees, ids, strict=True))}
    true_ids, false_ids = attributes["nodes_truenodeids"], attributes["nodes_falsenodeids"]
    nan_true = attributes.get("nodes_missing_value_tracks_true") or [0] * len(ids)
    if set(modes) - {*BRANCHES, "LEAF"}:
        raise Unsupported(f"node modes {sorted(set(modes) - {*BRANCHES, 'LEAF'})}")
    children = {
        (trees[i], child) for i in range(len(ids)) if modes[i] != "LEAF" for child in (true_ids[i], false_ids[i])
    }
    roots = [i for i, key in enumerate(zip(trees, ids, strict=True)) if key not in children]
    if len(roots) != len(set(trees)):
        raise Unsupported("a tree without exactly one root")
    splits: dict[int, int] = {}
    paths: list[list[tuple[int, bool]]] = []
    leaves: dict[tuple[int, int], list[int]] = {}
    stack = [(root, []) for root in reversed(roots)]
    while stack:
        i, path = stack.pop()
        if len(path) > MAX_TREE_DEPTH:
            raise Unsupported(f"a tree deeper than {MAX_TREE_DEPTH}")
        if modes[i] == "LEAF":
            leaves.setdefault((trees[i], ids[i]), []).append(len(paths))
            paths.append(path)
            continue
        split = splits.setdefault(i, len(splits))
        for taken, child in ((False, false_ids[i]), (True, true_ids[i])):
            if (trees[i], child) not in index:
                raise Unsupported(f"tree {trees[i]} node {ids[i]} points to a missing node {child}")
            stack.append((index[(trees[i], child)], [*path, (split, taken)]))
    order = sorted(splits, key=splits.get)
    return _Ensemble(
        features=np.array([attributes["nodes_featureids"][i] for i in order], np.int64),
        thresholds=np.array([attributes["nodes_values"][i] for i in order], np.float32),
        modes=[modes[i] for i in order],
        nan_true=np.array([bool(nan_true[i]) for i in order]),
        paths=paths,
        leaves=leaves,
        trees=len(set(trees)),
    )


def _leaf_weights(ensemble: _Ensemble, attributes: dict, prefix: str, outputs: int) -> np.ndarray:
    """[leaves, outputs]: each leaf's weights from the class_* or target_* attribute lists."""
    weights = np.zeros((len(ensemble.paths), outputs), np.float32)
    entries = zip(attributes[f"{prefix}_treeids"], attributes[f"{prefix}_nodeids"], attributes[f"{prefix}_ids"],
                  attributes[f"{prefix}_weights"], strict=True)  # fmt: skip
    for tree, node, target, weight in entries:
        if (tree, node) not in ensemble.leaves or not 0 <= target < outputs:
            raise Unsupported(f"a weight on tree {tree} node {node}, which is not a leaf, or for output {target}")
        for leaf in ensemble.leaves[(tree, node)]:
            weights[leaf, target] += np.float32(weight)
    return weights


def _leaf_sums(b: _Builder, ensemble: _Ensemble, weights: np.ndarray) -> str:
    """Σ over trees of the reached leaf's weights: [N, outputs]. Every split is one comparison of a gathered
    feature; a leaf is reached where all conditions on its path hold (a gather of the decisions and their
    negations per path step, ANDed); the reached leaves select their weights in one MatMul. The routing stays
    boolean, so int8 quantizers can only touch the weights, never which leaf is reached."""
    x = b.float_input(b.node.input[0], double=False)
    if not len(ensemble.features):
        raise Unsupported("every tree is a single leaf")
    columns = np.zeros(len(ensemble.features), np.int64)  # split → its column in the decisions
    decisions, offset = [], 0
    for mode in sorted(set(ensemble.modes)):  # one comparison per mode, its splits' columns next to each other
        members = np.flatnonzero(np.array(ensemble.modes) == mode)
        columns[members] = offset + np.arange(len(members))
        offset += len(members)
        values = b.op("Gather", [x, b.const("features", ensemble.features[members])], axis=1)
        decided = b.op(BRANCHES[mode], [values, b.const("thresholds", ensemble.thresholds[members])])
        if mode == "BRANCH_NEQ":
            decided = b.op("Not", [decided])
        if ensemble.nan_true[members].any():
            missing = b.op("And", [b.op("IsNaN", [values]), b.const("nan_true", ensemble.nan_true[members])])
            decided = b.op("Or", [decided, missing])
        decisions.append(decided)
    taken = decisions[0] if len(decisions) == 1 else b.op("Concat", decisions, axis=1)
    both = b.op("Concat", [taken, b.op("Not", [taken])], axis=1)  # column c: split c true; S + c: false
    depth = max(len(path) for path in ensemble.paths)
    routed = [path for path in ensemble.paths if path]
    steps = np.zeros((depth, len(routed)), np.int64)
    for leaf, path in enumerate(routed):
        picks = [columns[split] + (0 if branch else len(columns)) for split, branch in path]
        steps[:, leaf] = picks + picks[:1] * (depth - len(picks))  # a repeated condition changes no AND
    reached = None
    for step in steps:
        condition = b.op("Gather", [both, b.const("path_step", step)], axis=1)
        reached = condition if reached is None else b.op("And", [reached, condition])
    on_path = np.array([bool(path) for path in ensemble.paths])
    sums = b.op("MatMul", [b.op("Cast", [reached], to=FLOAT), b.const("leaf_weights", weights[on_path])])
    constant = weights[~on_path].sum(axis=0)  # single-leaf trees always reach their leaf
    return b.op("Add", [sums, b.const("single_leaf_trees", constant)]) if constant.any() else sums


def _tree_ensemble_classifier(node, b: _Builder) -> None:
    """ONNX Runtime's TreeEnsembleClassifier: class scores are the sums of the reached leaves' weights. With more
    than two classes, plus base_values, the label of the highest and the post_transform. With two classes and
    weights for class 0 only (skl2onnx's binary forests and boosting), the score s picks labels[1] where above
    0.5 (all weights >= 0) or 0, and the probabilities are [1 - s, s] (all >= 0), [σ(-s), σ(s)] (LOGISTIC) or
    [-s, s]."""
    attributes = _attributes(node)
    labels = _int_labels(attributes, "classlabels_int64s")
    classes = len(labels)
    transform = attributes.get("post_transform", "NONE")
    base = np.asarray(attributes.get("base_values", []), np.float32)
    ensemble = _ensemble(attributes)
    weights = _leaf_weights(ensemble, attributes, "class", classes)
    if classes > 2:
        if base.size not in (0, classes):
            raise Unsupported(f"{base.size} base_values for {classes} classes")
        if not base.size:
            _require_scored(ensemble, attributes, classes)
        scores = _leaf_sums(b, ensemble, weights)
        if base.any():
            scores = b.op("Add", [scores, b.const("base_values", base)])
        b.output(0, _label_of_max(b, scores, labels))
        b.output(1, _post_transform(b, scores, transform))
        return
    if classes != 2 or set(attributes["class_ids"]) != {0} or base.size > 1 or transform == "PROBIT":
        raise Unsupported("a two-class ensemble other than with weights for class 0 only (skl2onnx's)")
    score = _leaf_sums(b, ensemble, weights[:, :1])
    if base.any():
        score = b.op("Add", [score, b.const("base_values", base)])
    positive = all(w >= 0 for w in attributes["class_weights"])
    b.output(0, _label_above(b, score, 0.5 if positive else 0.0, labels))
    if positive:
        negative = b.op("Sub", [b.const("one", np.float32(1)), score])
    elif transform == "LOGISTIC":
        negative, score = b.op("Sigmoid", [b.op("Neg", [score])]), b.op("Sigmoid", [score])
    else:
        negative = b.op("Neg", [score])
    b.output(1, b.op("Concat", [negative, score], axis=1))


def _require_scored(ensemble: _Ensemble, attributes: dict, classes: int) -> None:
    """ONNX Runtime picks the label among the classes some reached leaf has a weight for; that is every class when
    some tree lists every class at every leaf (as skl2onnx writes forests), which is what this lowering handles."""
    listed: dict[tuple[int, int], set[int]] = {}
    for tree, node, target in zip(attributes["class_treeids"], attributes["class_nodeids"], attributes["class_ids"],
                                  strict=True):  # fmt: skip
        listed.setdefault((tree, node), set()).add(target)
    by_tree: dict[int, list[set[int]]] = {}
    for tree, node in ensemble.leaves:
        by_tree.setdefault(tree, []).append(listed.get((tree, node), set()))
    covered = set().union(*(set.intersection(*sets) for sets in by_tree.values()))
    if len(covered) < classes:
        raise Unsupported("classes without a weight at every leaf of some tree")


def _tree_ensemble_regressor(node, b: _Builder) -> None:
    """ONNX Runtime's TreeEnsembleRegressor with SUM or AVERAGE: the reached leaves' weights summed (divided by
    the tree count), plus base_values (one for a single target; one per target otherwise); the post_transform
    applies only across several targets."""
    attributes = _attributes(node)
    targets = attributes.get("n_targets", 1)
    aggregate = attributes.get("aggregate_function", "SUM")
    transform = attributes.get("post_transform", "NONE")
    if aggregate not in ("SUM", "AVERAGE") or (targets == 1 and transform == "PROBIT"):
        raise Unsupported(f"aggregate_function {aggregate}" if targets > 1 or transform != "PROBIT" else "PROBIT")
    ensemble = _ensemble(attributes)
    values = _leaf_sums(b, ensemble, _leaf_weights(ensemble, attributes, "target", targets))
    if aggregate == "AVERAGE":
        values = b.op("Div", [values, b.const("trees", np.float32(ensemble.trees))])
    base = np.asarray(attributes.get("base_values", []), np.float32)
    if base.size == targets and base.any():
        values = b.op("Add", [values, b.const("base_values", base)])
    b.output(0, _post_transform(b, values, transform) if targets > 1 else values)


def _activation(b: _Builder, x: str, activation: str, parameters: list[float]) -> str:
    """ONNX Runtime's fused activation as its own standard op."""
    if activation == "Identity":
        return x
    names = ACTIVATIONS.get(activation)
    if names is None or len(parameters) not in (0, len(names)):
        raise Unsupported(f"fused activation {activation} with {len(parameters)} parameters")
    if activation == "Clip":  # bounds are inputs from opset 11
        bounds = [b.const(name, np.float32(value)) for name, value in zip(names, parameters, strict=True)]
        return b.op("Clip", [x, *bounds], name=b.fresh(activation))
    return b.op(activation, [x], name=b.fresh(activation), **dict(zip(names, parameters, strict=False)))


def _fused_conv(node, b: _Builder) -> None:
    """com.microsoft FusedConv: activation(Conv(X, W, B) + Z); the Conv keeps the node's name."""
    attributes = _attributes(node)
    activation = attributes.pop("activation", "Identity")
    parameters = attributes.pop("activation_params", [])
    inputs = list(node.input)
    conv = b.op("Conv", [name for name in inputs[:3]], name=node.name or None, **attributes)
    if len(inputs) > 3 and inputs[3]:
        conv = b.op("Add", [conv, inputs[3]])
    b.output(0, _activation(b, conv, activation, parameters))


def _fused_gemm(node, b: _Builder) -> None:
    """com.microsoft FusedGemm: activation(Gemm(A, B, C)), the activation's parameters as activation_alpha,
    _beta and _gamma; the Gemm keeps the node's name."""
    attributes = _attributes(node)
    activation = attributes.pop("activation", "Identity")
    named = {key: attributes.pop(f"activation_{key}") for key in ("alpha", "beta", "gamma")
             if f"activation_{key}" in attributes}  # fmt: skip
    names = ACTIVATIONS.get(activation, ())
    if activation == "Clip" or set(named) - set(names):
        raise Unsupported(f"fused activation {activation} with parameters {sorted(named)}")
    gemm = b.op("Gemm", list(node.input), name=node.name or None, **attributes)
    b.output(0, _activation(b, gemm, activation, [named[n] for n in names] if named else []))


def _lstm(node, b: _Builder) -> None:
    """A forward LSTM (ONNX's default gates and activations, no peepholes, clip or sequence lengths) unrolled
    over its static time steps as Gemm, Split, Sigmoid, Tanh, Mul and Add: ops every converter maps, where
    onnx2tf's LSTM fails on the state shapes of exported voice detectors. The first Gemm keeps the node's name."""
    attributes = _attributes(node)
    supported = {"hidden_size", "direction", "layout", "activations"}
    if set(attributes) - supported or attributes.get("direction", "forward") != "forward":
        raise Unsupported(f"LSTM with {', '.join(sorted(set(attributes) - {'hidden_size'}))}")
    if attributes.get("layout", 0) != 0 or attributes.get("activations", LSTM_ACTIVATIONS) != LSTM_ACTIVATIONS:
        raise Unsupported("LSTM with batch-first layout or custom activations")
    x, w, r, bias, lengths, initial_h, initial_c, peepholes = [*node.input, *[""] * (8 - len(node.input))]
    if lengths or peepholes:
        raise Unsupported("LSTM with sequence lengths or peepholes")
    elem_type, dims = b.types.get(x, (0, None))
    if dims is None or None in dims or elem_type not in (FLOAT, FLOAT16) or dims[0] > MAX_UNROLLED_STEPS:
        raise Unsupported(f"LSTM over input of unknown, non-float or more than {MAX_UNROLLED_STEPS}-step shape")
    steps, batch, hidden = dims[0], dims[1], attributes["hidden_size"]
    # Weights as transposed 2-D constants and x_t by Reshape: onnx2tf makes 3-D tensors channels-last, and a
    # Squeeze of one then feeds its Gemm transposed.
    weight = b.const("W", b.constant(w)[0].T.copy())
    recurrence = b.const("R", b.constant(r)[0].T.copy())
    gate_bias = [b.const("B", b.constant(bias)[0].reshape(2, -1).sum(axis=0))] if bias else []
    flat = b.const("shape", np.array([batch, -1], np.int64))
    zeros = np.zeros((batch, hidden), np.float16 if elem_type == FLOAT16 else np.float32)
    h = b.op("Reshape", [initial_h, flat]) if initial_h else b.const("h0", zeros)
    c = b.op("Reshape", [initial_c, flat]) if initial_c else b.const("c0", zeros)
    outputs = []
    for step in range(steps):
        x_t = b.op("Reshape", [x if steps == 1 else b.op("Gather", [x, b.const("t", np.int64(step))], axis=0), flat])
        name = (node.name or None) if step == 0 else None
        gates = b.op("Add", [b.op("Gemm", [x_t, weight, *gate_bias], name=name),
                             b.op("MatMul", [h, recurrence])])  # fmt: skip
        input_gate, output_gate, forget_gate, cell = b.split(gates, [hidden] * 4, axis=1)
        c = b.op("Add", [b.op("Mul", [b.op("Sigmoid", [forget_gate]), c]),
                         b.op("Mul", [b.op("Sigmoid", [input_gate]), b.op("Tanh", [cell])])])  # fmt: skip
        h = b.op("Mul", [b.op("Sigmoid", [output_gate]), b.op("Tanh", [c])])
        outputs.append(b.axes("Unsqueeze", h, [0, 1]))
    b.output(0, outputs[0] if steps == 1 else b.op("Concat", outputs, axis=0))
    b.output(1, b.axes("Unsqueeze", h, [0]))
    b.output(2, b.axes("Unsqueeze", c, [0]))


LOWERINGS: dict[tuple[str, str], Callable] = {
    (ML, "LinearClassifier"): _linear_classifier,
    (ML, "LinearRegressor"): _linear_regressor,
    (ML, "Normalizer"): _normalizer,
    (ML, "Scaler"): _scaler,
    (ML, "ArrayFeatureExtractor"): _array_feature_extractor,
    (ML, "TreeEnsembleClassifier"): _tree_ensemble_classifier,
    (ML, "TreeEnsembleRegressor"): _tree_ensemble_regressor,
    (MS, "FusedConv"): _fused_conv,
    (MS, "FusedGemm"): _fused_gemm,
}


# Standard ops some converters fail on, unrolled for those backends only (the others run them as they are).
UNROLLINGS: dict[tuple[str, str], Callable] = {("", "LSTM"): _lstm}


def unroll_recurrent(model) -> tuple[object, list[str], list[str]]:
    """The model with its recurrent layers unrolled where UNROLLINGS can, the names of the nodes that compute them
    now, and why any were not unrolled. Weights only the unrolled layers read are dropped."""
    nodes: list[str] = []
    skipped: list[str] = []
    for key in UNROLLINGS:
        if any((node.domain, node.op_type) == key for node in model.graph.node):
            unrolled = lower(model, key, UNROLLINGS)
            model = unrolled.model or model
            nodes.extend(unrolled.nodes)
            skipped.extend(unrolled.skipped)
    if nodes:
        _drop_unread_initializers(model.graph)
    return model, nodes, skipped


def _drop_unread_initializers(graph) -> None:
    read = {name for node in graph.node for name in node.input} | {value.name for value in graph.output}
    for init in [init for init in graph.initializer if init.name not in read]:
        graph.initializer.remove(init)


def lowerable(model) -> list[tuple[str, str]]:
    """The (domain, op type) families in the model's main graph that have a lowering, in order of appearance."""
    found = [(node.domain, node.op_type) for node in model.graph.node]
    return [key for key in dict.fromkeys(found) if key in LOWERINGS]


def lower(model, key: tuple[str, str], rewrites: dict[tuple[str, str], Callable] = LOWERINGS) -> Lowered:
    """A copy of the model with every node of the `key` family that its rewrite handles replaced by standard ops."""
    import onnx

    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    result = Lowered(model=None)
    if opset < MIN_OPSET:
        result.skipped.append(f"opset {opset} is below {MIN_OPSET}")
        return result
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    graph = lowered.graph
    types = tensor_types(lowered)
    initializers = {init.name: init for init in graph.initializer}
    taken = {n.name for n in graph.node} | {o for n in graph.node for o in (*n.input, *n.output)}
    taken |= {value.name for value in (*graph.input, *graph.output, *graph.initializer)}
    nodes = []
    for node in graph.node:
        if (node.domain, node.op_type) != key:
            nodes.append(node)
            continue
        builder = _Builder(node, opset, types, taken, initializers)
        try:
            rewrites[key](node, builder)
            replacement = builder.finish()
        except Unsupported as reason:
            result.skipped.append(str(reason))
            nodes.append(node)
            continue
        nodes.extend(replacement)
        result.nodes.extend(n.name for n in replacement)
        graph.initializer.extend(builder.initializers)
        result.count += 1
        result.ops.extend(op for op in dict.fromkeys(n.op_type for n in replacement) if op not in result.ops)
    if not result.count:
        return result
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(node.domain == key[0] for node in graph.node) and not lowered.functions:
        kept = [opset for opset in lowered.opset_import if opset.domain != key[0]]
        del lowered.opset_import[:]
        lowered.opset_import.extend(kept)
    result.model = lowered
    return result


def tensor_types(model) -> dict[str, tuple[int, Dims]]:
    """Element type and dims (None where unknown: the rank, or a dim) of every tensor ONNX's shape inference can
    type."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # inference raises assorted errors; the graph's own inputs are still typed
        inferred = model.graph
    types = {}
    for value in (*inferred.input, *inferred.value_info, *inferred.output):
        if value.type.HasField("tensor_type"):
            tensor = value.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
            types[value.name] = (tensor.elem_type, dims if tensor.HasField("shape") else None)
    for init in inferred.initializer:
        types[init.name] = (init.data_type, tuple(init.dims))
    return types
