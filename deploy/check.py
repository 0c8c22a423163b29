#!/usr/bin/env python3
"""Offline checks of deploy/: `make check-deploy` runs this (and `make test` runs that).

1. Prometheus: `promtool check config` on the scrape config (which loads the rules),
   `promtool check rules`, and `promtool test rules` on every file in prometheus/tests/.
2. Metric names: every `ddpm_*` name in the rules and the dashboard is one the code exports
   (a string in crates/*/src), the evaluator's (see EVALUATOR_METRICS), or a recording rule.
3. Grafana: the dashboard is JSON with unique panel ids, every panel on the ${datasource}
   variable, and every query valid PromQL (checked by promtool as recording rules).
4. Kubernetes: every kustomization under k8s/ (base, overlays) renders with
   `kubectl kustomize`, and every rendered object validates against the Kubernetes schemas
   (kubernetes-validate --strict, for the newest and the oldest supported version). The one
   custom resource, the Prometheus Operator's PodMonitor, has no schema there: it is checked
   against the subset of its CRD schema in POD_MONITOR_SCHEMA instead. Then the overlays are
   checked for consistency: the worker replicas equal the coordinator's world size, the
   config the pods name is in the ConfigMap, and every PodMonitor selects pods with a port
   named as its endpoint.
5. Flags: every --flag that a rendered container passes to `coordinator`, `worker` or
   `evaluator` is one that binary's --help lists (binaries from --bin-dir; one that is not
   built there is named as unchecked).

Usage: check.py [--promtool P] [--validator V] [--kubectl K] [--bin-dir DIR]
"""

import argparse
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib

import jsonschema
import yaml

DEPLOY = pathlib.Path(__file__).resolve().parent
ROOT = DEPLOY.parent

# Exported by the evaluator (ddpm-evaluator), which other work adds. While no crate of this
# tree exports any ddpm_eval_* name, these are taken as given; once one does, the rules and
# the dashboard must use the names the code exports.
EVALUATOR_METRICS = {"ddpm_eval_fid", "ddpm_eval_is_mean"}

# The oldest Kubernetes the manifests support: the pod-index label that becomes --rank.
KUBERNETES_VERSIONS = ["1.28.0", "1.37.0"]

DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
POD_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector", "podMetricsEndpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": {
                    "type": "object",
                    "required": ["matchLabels"],
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "minProperties": 1,
                            "additionalProperties": {"type": "string"},
                        }
                    },
                },
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": DURATION},
                        },
                    },
                },
            },
        },
    },
}


class Failed(Exception):
    pass


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise Failed(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return r.stdout


def check_prometheus(promtool):
    prom = DEPLOY / "prometheus"
    run([promtool, "check", "config", prom / "prometheus.yml"])
    run([promtool, "check", "rules", prom / "rules.yml"])
    tests = sorted((prom / "tests").glob("*.yml"))
    if not tests:
        raise Failed(f"no rule tests in {prom / 'tests'}")
    for t in tests:
        out = run([promtool, "test", "rules", t.name], cwd=t.parent)
        if "SUCCESS" not in out:
            raise Failed(f"promtool test rules {t}: no SUCCESS in\n{out}")
    return 2 + len(tests)


def exported_metrics():
    names = set()
    for f in ROOT.glob("crates/*/src/**/*.rs"):
        names |= set(re.findall(r'"(ddpm_[a-z0-9_]+)"', f.read_text()))
    return names


def used_metrics(expr):
    return set(re.findall(r"\b(ddpm_[a-z0-9_]+)", expr))


def base_name(name, known):
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in known:
            return name[: -len(suffix)]
    return name


def check_metric_names(rule_exprs, dashboard_exprs):
    code = exported_metrics()
    if not code:
        raise Failed("found no ddpm_* metric names in crates/*/src")
    if any(n.startswith("ddpm_eval_") for n in code):
        known = code
    else:
        known = code | EVALUATOR_METRICS
    unknown = []
    for where, exprs in (("deploy/prometheus/rules.yml", rule_exprs), ("deploy/grafana", dashboard_exprs)):
        for expr in exprs:
            for n in used_metrics(expr):
                if base_name(n, known) not in known:
                    unknown.append(f"{where}: {n} (in {expr.strip()[:80]!r})")
    if unknown:
        raise Failed("metric names that no crate exports:\n  " + "\n  ".join(unknown))
    return 1


def rule_expressions():
    doc = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    return [r["expr"] for g in doc["groups"] for r in g["rules"]]


def check_dashboards(promtool):
    exprs = []
    count = 0
    for f in sorted((DEPLOY / "grafana").glob("*.json")):
        d = json.loads(f.read_text())
        for key in ("title", "uid", "panels"):
            if key not in d:
                raise Failed(f"{f}: no {key!r}")
        ids = [p["id"] for p in d["panels"]]
        if len(ids) != len(set(ids)):
            raise Failed(f"{f}: duplicate panel ids {ids}")
        for p in d["panels"]:
            if p.get("datasource", {}).get("uid") != "${datasource}":
                raise Failed(f"{f}: panel {p['title']!r} is not on the ${{datasource}} variable")
            if not p.get("targets"):
                raise Failed(f"{f}: panel {p['title']!r} has no query")
            for t in p["targets"]:
                exprs.append((f, p["title"], t["expr"]))
        count += 1
    if count == 0:
        raise Failed(f"no dashboards in {DEPLOY / 'grafana'}")
    rules = {"groups": [{"name": "dashboard", "rules": []}]}
    for i, (f, title, e) in enumerate(exprs):
        e = e.replace("$__rate_interval", "1m").replace("$namespace", ".*")
        if "$" in e:
            raise Failed(f"{f}: panel {title!r}: unknown variable in {e!r}")
        rules["groups"][0]["rules"].append({"record": f"dashboard:query_{i}", "expr": e})
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as tmp:
        yaml.safe_dump(rules, tmp)
        tmp.flush()
        run([promtool, "check", "rules", tmp.name])
    return count, [e for _, _, e in exprs]


def kustomizations():
    dirs = sorted(p.parent for p in (DEPLOY / "k8s").rglob("kustomization.yaml"))
    # Components are rendered through the overlays that use them.
    return [d for d in dirs if yaml.safe_load((d / "kustomization.yaml").read_text())["kind"] == "Kustomization"]


def container_args(obj):
    c = obj["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    return c.get("args", []), env


def flag(args, name):
    if name in args:
        i = args.index(name)
        if i + 1 >= len(args):
            raise Failed(f"{name} without a value")
        return args[i + 1]
    return None


def check_consistency(where, objs):
    by_kind = {}
    for o in objs:
        by_kind.setdefault(o["kind"], []).append(o)
    configmaps = {o["metadata"]["name"]: o for o in by_kind.get("ConfigMap", [])}
    coordinator = [o for o in by_kind.get("Deployment", []) if o["metadata"]["name"] == "ddpm-coordinator"]
    workers = [o for o in by_kind.get("StatefulSet", []) if o["metadata"]["name"] == "ddpm-worker"]
    if len(coordinator) != 1 or len(workers) != 1:
        raise Failed(f"{where}: expected one ddpm-coordinator Deployment and one ddpm-worker StatefulSet")
    coordinator, workers = coordinator[0], workers[0]
    args, env = container_args(coordinator)
    config_arg = flag(args, "--config")
    config_name = config_arg.replace("$(DDPM_CONFIG)", env.get("DDPM_CONFIG") or "")
    config_name = config_name.rsplit("/", 1)[-1]
    mounted = [
        v["configMap"]["name"]
        for v in coordinator["spec"]["template"]["spec"]["volumes"]
        if "configMap" in v
    ]
    if len(mounted) != 1 or mounted[0] not in configmaps:
        raise Failed(f"{where}: the coordinator mounts ConfigMap(s) {mounted}, rendered are {sorted(configmaps)}")
    data = configmaps[mounted[0]]["data"]
    if config_name not in data:
        raise Failed(f"{where}: the coordinator's --config {config_name} is not in ConfigMap {mounted[0]} ({sorted(data)})")
    config = tomllib.loads(data[config_name])
    world = flag(args, "--world-size")
    world = int(world) if world is not None else config.get("distributed", {}).get("world_size", 1)
    replicas = workers["spec"].get("replicas", 1)
    if replicas != world:
        raise Failed(f"{where}: {replicas} worker replica(s), but the coordinator's world size is {world} ({config_name} and --world-size)")
    batch = config.get("train", {}).get("batch_size", 128)
    if world > batch:
        raise Failed(f"{where}: world size {world} exceeds train.batch_size {batch} of {config_name}")
    # Every worker and evaluator reaches the coordinator's Service, with the scheme its TLS
    # setting asks for.
    tls = flag(args, "--tls-cert") is not None
    for o in [workers] + [d for d in by_kind.get("Deployment", []) if d is not coordinator]:
        a, _ = container_args(o)
        url = flag(a, "--coordinator")
        want = "https://ddpm-coordinator:50051" if tls else "http://ddpm-coordinator:50051"
        if url != want:
            raise Failed(f"{where}: {o['kind']} {o['metadata']['name']} connects to {url}, expected {want}")
    # PodMonitors select pods that have the named port.
    pods = [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]
    for pm in by_kind.get("PodMonitor", []):
        jsonschema.validate(pm, POD_MONITOR_SCHEMA)
        sel = pm["spec"]["selector"]["matchLabels"]
        matched = [p for p in pods if sel.items() <= p["spec"]["template"]["metadata"]["labels"].items()]
        if not matched:
            raise Failed(f"{where}: PodMonitor {pm['metadata']['name']} selects no pod template")
        for p in matched:
            ports = {port.get("name") for c in p["spec"]["template"]["spec"]["containers"] for port in c.get("ports", [])}
            for ep in pm["spec"]["podMetricsEndpoints"]:
                if ep["port"] not in ports:
                    raise Failed(f"{where}: PodMonitor {pm['metadata']['name']}: {p['metadata']['name']} has no port named {ep['port']}")
            job = pm["spec"].get("jobLabel")
            if job and job not in p["spec"]["template"]["metadata"]["labels"]:
                raise Failed(f"{where}: PodMonitor {pm['metadata']['name']}: jobLabel {job} is not a label of {p['metadata']['name']}")


def container_flags(objs):
    """{binary: {flags}} over every rendered container."""
    flags = {}
    for o in objs:
        if o["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for c in o["spec"]["template"]["spec"]["containers"]:
            binary = c.get("command", [""])[0]
            flags.setdefault(binary, set()).update(a for a in c.get("args", []) if a.startswith("--"))
    return flags


def check_flags(flags, bin_dir):
    unchecked = []
    for binary, used in sorted(flags.items()):
        exe = pathlib.Path(bin_dir) / binary
        if not exe.exists():
            unchecked.append(binary)
            continue
        help_text = run([str(exe), "--help"])
        known = set(re.findall(r"(--[a-z][a-z0-9-]*)", help_text))
        missing = sorted(used - known)
        if missing:
            raise Failed(f"the manifests pass {missing} to {binary}, whose --help does not list them")
        print(f"  flags of {binary}: {len(used)} used, all in its --help")
    for binary in unchecked:
        print(f"  flags of {binary}: NOT CHECKED ({pathlib.Path(bin_dir) / binary} is not built)")


def check_kubernetes(kubectl, validator, bin_dir):
    dirs = kustomizations()
    if not any(d.name == "base" for d in dirs) or not any(d.parent.name == "overlays" for d in dirs):
        raise Failed(f"expected deploy/k8s/base and overlays, found {[str(d) for d in dirs]}")
    checked = 0
    flags = {}
    with tempfile.TemporaryDirectory() as tmp:
        for d in dirs:
            where = str(d.relative_to(ROOT))
            rendered = run(kubectl + ["kustomize", str(d)])
            objs = [o for o in yaml.safe_load_all(rendered) if o]
            if not objs:
                raise Failed(f"{where} renders nothing")
            builtin = [o for o in objs if o["kind"] != "PodMonitor"]
            out = pathlib.Path(tmp) / (where.replace("/", "_") + ".yaml")
            out.write_text(yaml.safe_dump_all(builtin))
            for version in KUBERNETES_VERSIONS:
                run([validator, "--strict", "--quiet", "-k", version, str(out)])
            check_consistency(where, objs)
            for binary, used in container_flags(objs).items():
                flags.setdefault(binary, set()).update(used)
            print(f"  {where}: {len(objs)} objects rendered and valid")
            checked += 1
    check_flags(flags, bin_dir)
    return checked


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--promtool", default=str(ROOT / ".tools/prometheus/bin/promtool"))
    ap.add_argument("--validator", default=str(ROOT / ".tools/k8s/bin/kubernetes-validate"))
    ap.add_argument("--kubectl", default=None)
    ap.add_argument("--bin-dir", default=str(ROOT / "target" / "debug"))
    a = ap.parse_args()
    kubectl = a.kubectl or shutil.which("kubectl") or str(ROOT / ".tools/k8s/bin/kubectl")
    for tool in (a.promtool, a.validator, kubectl):
        if not pathlib.Path(tool).exists():
            print(f"error: {tool} is missing: run `make test-tools`", file=sys.stderr)
            return 1
    try:
        n = check_prometheus(a.promtool)
        print(f"  prometheus: config, rules and {n - 2} rule test file(s) pass")
        dashboards, dashboard_exprs = check_dashboards(a.promtool)
        print(f"  grafana: {dashboards} dashboard(s), {len(dashboard_exprs)} queries parse")
        check_metric_names(rule_expressions(), dashboard_exprs)
        print("  metric names: every ddpm_* name in rules and dashboards is exported")
        k = check_kubernetes([kubectl], a.validator, a.bin_dir)
    except (Failed, jsonschema.ValidationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"deploy checks passed ({k} kustomizations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
