"""Checks on rendered plugca manifests, run by deploy/check.sh.

  check-manifests.py compare CHART.yaml KUSTOMIZE.yaml
      the chart with default values and the kustomize base say the same thing
  check-manifests.py rbac-file RBAC.yaml CHART.yaml
      deploy/rbac/plugca-rbac.yaml equals the chart's base objects
  check-manifests.py features default|all|minimal RENDERED.yaml
      what each feature set renders: objects, RBAC rules, flags, pod spec
  check-manifests.py istio ISTIOD.yaml ZTUNNEL.yaml CA_ADDRESS
      Istio's own charts, rendered with the values of docs/istio-with-plugca.md,
      point sidecars and ztunnel at plugca, turn istiod's CA off and mount
      istiod-tls and istio-ca-root-cert
  check-manifests.py flags RENDERED.yaml SRC_DIR
      every flag passed is a flag of `plugca serve` declared in SRC_DIR: a clap
      `long` field of ServeArgs or a struct it flattens, or an entry of
      src/config.rs' `mod flag` table

Exits 1 with one line per difference; prints one line per check passed.
"""

import pathlib
import re
import sys

import yaml

# The in-cluster controllers' flags (src/controllers/args.rs): the minimal
# render must pass none of them.
CONTROLLER_FLAGS = {
    "root-configmap",
    "root-configmap-namespace-selector",
    "root-configmap-exclude-namespaces",
    "istiod-tls-secret",
    "istiod-namespace",
    "istiod-revisions",
    "istiod-extra-dns-names",
    "leader-election-namespace",
    "leader-election-lease",
}

# Labels only Helm adds; everything else must match.
HELM_LABELS = {
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
}

failures = []


def fail(msg):
    failures.append(msg)


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def key(obj):
    return (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])


def index(docs):
    return {key(d): d for d in docs}


def strip_helm(obj):
    """A copy without Helm's own labels, for comparing with kustomize."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k == "labels" and isinstance(v, dict):
                v = {lk: lv for lk, lv in v.items() if lk not in HELM_LABELS}
            out[k] = strip_helm(v)
        return out
    if isinstance(obj, list):
        return [strip_helm(v) for v in obj]
    return obj


def container(deploy):
    return deploy["spec"]["template"]["spec"]["containers"][0]


def diff(path, a, b, out, other="kustomize"):
    """Paths where the chart's a and the other's b differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            diff(f"{path}.{k}", a.get(k), b.get(k), out, other)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            diff(f"{path}[{i}]", x, y, out, other)
    elif a != b:
        out.append(f"{path}: chart {a!r} != {other} {b!r}")
    return out


def compare(chart_path, kust_path):
    chart = index(strip_helm(load(chart_path)))
    kust = index(load(kust_path))
    if set(chart) != set(kust):
        only_c = sorted(set(chart) - set(kust))
        only_k = sorted(set(kust) - set(chart))
        fail(f"objects differ: only in chart {only_c}, only in kustomize {only_k}")
    else:
        print(f"ok: chart and kustomize render the same {len(chart)} objects")
    dep = ("Deployment", "istio-system", "plugca")
    if dep in chart and dep in kust:
        a, b = container(chart[dep])["args"], container(kust[dep])["args"]
        if a != b:
            fail(f"container args differ:\n  chart     {a}\n  kustomize {b}")
        else:
            print(f"ok: same container args ({len(a)})")
    for k in sorted(set(chart) & set(kust)):
        d = diff(f"{k[0]}/{k[2]}", chart[k], kust[k], [])
        for line in d:
            fail(line)
        if not d:
            print(f"ok: {k[0]}/{k[2]} identical apart from Helm's labels")


def rbac_file(rbac_path, chart_path):
    chart = index(strip_helm(load(chart_path)))
    for k, obj in index(load(rbac_path)).items():
        if k not in chart:
            fail(f"{rbac_path}: {k} is not rendered by the chart")
            continue
        d = diff(f"{k[0]}/{k[2]}", chart[k], obj, [], other="file")
        for line in d:
            fail(f"{rbac_path}: {line}")
        if not d:
            print(f"ok: {rbac_path} {k[0]}/{k[2]} equals the chart's")


def rules(docs, kind, name):
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d["rules"]
    return None


def flat_rules(rule_list):
    """(apiGroup, resource, verb, resourceName or '*') for every grant."""
    out = set()
    for r in rule_list or []:
        for g in r.get("apiGroups", []):
            for res in r["resources"]:
                for v in r["verbs"]:
                    for n in r.get("resourceNames") or ["*"]:
                        out.add((g, res, v, n))
    return out


def expect(cond, ok, bad):
    if cond:
        print(f"ok: {ok}")
    else:
        fail(bad)


def features(which, path):
    docs = load(path)
    if not any(d["kind"] == "Deployment" for d in docs):
        fail(f"{which}: {path} has no Deployment")
        return
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    dep = next(d for d in docs if d["kind"] == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    args = c["args"]
    flags = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    base = flat_rules(rules(docs, "ClusterRole", "plugca"))
    roles = {n for k, n in kinds if k in ("Role", "ClusterRole")}

    # The pod hardening holds in every feature set.
    sc, psc = c["securityContext"], pod["securityContext"]
    expect(
        psc.get("runAsNonRoot") and psc.get("runAsUser") == 65532 and psc.get("fsGroup") == 65532
        and psc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
        and sc.get("readOnlyRootFilesystem") and sc.get("allowPrivilegeEscalation") is False
        and sc.get("capabilities", {}).get("drop") == ["ALL"],
        f"{which}: non-root 65532, fsGroup, read-only root, no capabilities, RuntimeDefault",
        f"{which}: pod or container securityContext is not hardened: {psc} {sc}",
    )
    labels = dep["spec"]["template"]["metadata"]
    expect(
        labels["labels"].get("sidecar.istio.io/inject") == "false"
        and labels["annotations"].get("sidecar.istio.io/inject") == "false",
        f"{which}: never injected",
        f"{which}: sidecar.istio.io/inject is not \"false\" as label and annotation",
    )
    drain = next(int(a.split("=")[1].rstrip("s")) for a in args if a.startswith("--drain-timeout="))
    expect(
        pod["terminationGracePeriodSeconds"] > drain,
        f"{which}: grace {pod['terminationGracePeriodSeconds']} s > drain {drain} s",
        f"{which}: terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} <= --drain-timeout {drain}",
    )
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in c["env"]}
    expect(
        env.get("POD_NAME") == "metadata.name" and env.get("POD_NAMESPACE") == "metadata.namespace",
        f"{which}: POD_NAME and POD_NAMESPACE from the downward API",
        f"{which}: POD_NAME/POD_NAMESPACE missing: {env}",
    )
    probes = (c["readinessProbe"]["httpGet"]["path"], c["livenessProbe"]["httpGet"]["path"])
    expect(probes == ("/ready", "/healthz"), f"{which}: probes /ready and /healthz",
           f"{which}: probes are {probes}")
    expect(("authentication.k8s.io", "tokenreviews", "create", "*") in base,
           f"{which}: TokenReview create", f"{which}: ClusterRole plugca lacks tokenreviews create")
    # Nothing may read or delete what it does not own: no Secret or ConfigMap
    # by wildcard name except create, no delete except by name, no wildcards.
    every = set()
    for d in docs:
        if d["kind"] in ("Role", "ClusterRole"):
            every |= {(d["kind"],) + g for g in flat_rules(d["rules"])}
    bad = sorted(g for g in every
                 if (g[2] in ("secrets", "configmaps") and g[3] != "create" and g[4] == "*")
                 or (g[3] in ("delete", "deletecollection") and g[4] == "*")
                 or "*" in (g[1], g[2], g[3]))
    expect(not bad, f"{which}: Secrets and ConfigMaps only by name (but create), no wildcards",
           f"{which}: over-broad grants: {bad}")

    vols = {v["name"]: v for v in pod["volumes"]}
    if which == "default":
        s = vols["cacerts"].get("secret", {})
        expect(s.get("defaultMode") == 0o400 and s.get("optional") is False,
               f"{which}: cacerts Secret mounted with mode 0400, not optional",
               f"{which}: cacerts volume is {vols['cacerts']}")
        expect(("Role", "plugca-self-signed") not in kinds and "--self-signed-secret" not in flags,
               f"{which}: plugged CA, no self-signed Secret (flag or Role)",
               f"{which}: self-signed Secret configured next to the plugged CA: {sorted(kinds)}")
    if which in ("default", "all"):
        expect(dep["spec"]["replicas"] >= 2 and ("PodDisruptionBudget", "plugca") in kinds,
               f"{which}: {dep['spec']['replicas']} replicas with a PodDisruptionBudget",
               f"{which}: replicas {dep['spec']['replicas']}, kinds {sorted(kinds)}")
        expect(pod.get("priorityClassName") == "system-cluster-critical"
               and any(t["topologyKey"] == "kubernetes.io/hostname" for t in pod["topologySpreadConstraints"]),
               f"{which}: system-cluster-critical, spread over nodes",
               f"{which}: priorityClassName or topology spread missing")
        expect(("", "pods", "list", "*") in base and ("", "pods", "watch", "*") in base,
               f"{which}: pods list/watch for node authorization",
               f"{which}: node authorization on but no pods list/watch")
        expect({"plugca-root-configmap", "plugca-leader-election", "plugca-istiod-tls"} <= roles,
               f"{which}: roles for the root ConfigMap, leader election and istiod-tls",
               f"{which}: roles are {sorted(roles)}")
        tls = flat_rules(rules(docs, "Role", "plugca-istiod-tls"))
        expect(tls == {("", "secrets", v, "istiod-tls")
                       for v in ("get", "list", "watch", "update", "patch", "delete")}
               | {("", "secrets", "create", "*")},
               f"{which}: Secret istiod-tls by name, plus create",
               f"{which}: istiod-tls Role grants {sorted(tls)}")
        cm = flat_rules(rules(docs, "ClusterRole", "plugca-root-configmap"))
        expect({g for g in cm if g[1] == "configmaps"}
               == {("", "configmaps", v, "istio-ca-root-cert")
                   for v in ("get", "list", "watch", "update", "patch")}
               | {("", "configmaps", "create", "*")}
               and ("", "namespaces", "watch", "*") in cm,
               f"{which}: ConfigMaps only istio-ca-root-cert by name (plus create), namespaces watched",
               f"{which}: root-configmap ClusterRole grants {sorted(cm)}")
        for f in ("--root-configmap", "--istiod-tls-secret", "--leader-election-lease",
                  "--trusted-node-accounts", "--cacerts-dir"):
            expect(f in flags, f"{which}: passes {f}", f"{which}: does not pass {f}")
    if which == "all":
        for f in ("--remote-kubeconfigs", "--istiod-revisions",
                  "--istiod-extra-dns-names", "--root-configmap-namespace-selector",
                  "--root-configmap-exclude-namespaces", "--extra-trust-roots",
                  "--max-concurrent-signs", "--allow-root-replacement"):
            expect(f in flags, f"all: passes {f}", f"all: does not pass {f}")
        expect(("ServiceMonitor", "plugca") in kinds, "all: ServiceMonitor",
               f"all: kinds are {sorted(kinds)}")
        # The shared self-signed root: flag, no cacerts Secret, and a Role
        # granting get on that one Secret plus create (never by name).
        ss = [a.split("=", 1)[1] for a in args if a.startswith("--self-signed-secret=")]
        expect(ss == ["istio-system/plugca-root-east"] and "emptyDir" in vols["cacerts"],
               "all: --self-signed-secret=istio-system/plugca-root-east on an empty cacerts dir",
               f"all: --self-signed-secret {ss}, cacerts volume {vols['cacerts']}")
        roles_ns = {(d["kind"], d["metadata"]["name"]): d["metadata"].get("namespace") for d in docs}
        ssr = flat_rules(rules(docs, "Role", "plugca-self-signed"))
        expect(ssr == {("", "secrets", "get", "plugca-root-east"), ("", "secrets", "create", "*")}
               and roles_ns.get(("Role", "plugca-self-signed")) == "istio-system"
               and ("RoleBinding", "plugca-self-signed") in kinds,
               "all: Role plugca-self-signed in istio-system: get Secret plugca-root-east by name, plus create",
               f"all: plugca-self-signed Role grants {sorted(ssr)} in {roles_ns.get(('Role', 'plugca-self-signed'))}")
        # No offline schema for the Prometheus operator's CRD: check what matters.
        sm = next((d for d in docs if d["kind"] == "ServiceMonitor"), None)
        svc = next(d for d in docs if d["kind"] == "Service")
        if sm:
            ep = sm["spec"]["endpoints"][0]
            expect(ep["port"] in {p["name"] for p in svc["spec"]["ports"]} and ep["path"] == "/metrics"
                   and sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items(),
                   "all: ServiceMonitor scrapes the Service's http-monitoring port at /metrics",
                   f"all: ServiceMonitor {sm['spec']} does not match Service {svc['spec']['ports']}")
        ns = {d["metadata"]["name"]: d["metadata"].get("namespace") for d in docs if d["kind"] == "Role"}
        expect(ns.get("plugca-istiod-tls") == "istio-control" and ns.get("plugca-leader-election") == "plugca-leases",
               "all: istiod-tls Role in istiod's namespace, Lease Role in the election namespace",
               f"all: Role namespaces are {ns}")
        proj = vols.get("remote-kubeconfigs", {}).get("projected", {}).get("sources", [])
        expect(len(proj) == 2, "all: remote kubeconfig Secrets projected into one directory",
               f"all: remote-kubeconfigs volume is {vols.get('remote-kubeconfigs')}")
    if which == "minimal":
        expect(base == {("authentication.k8s.io", "tokenreviews", "create", "*")},
               "minimal: ClusterRole plugca is TokenReview create only",
               f"minimal: ClusterRole plugca grants {sorted(base)}")
        expect(roles == {"plugca"}, "minimal: no other Role or ClusterRole",
               f"minimal: roles are {sorted(roles)}")
        expect(not (flags & {"--" + f for f in CONTROLLER_FLAGS})
               and "--trusted-node-accounts" not in flags and "--self-signed-secret" not in flags,
               "minimal: no controller or node-authorization flags",
               f"minimal: flags are {sorted(flags)}")
        expect("emptyDir" in vols["cacerts"] and ("PodDisruptionBudget", "plugca") not in kinds,
               "minimal: one replica on an empty cacerts dir, no PodDisruptionBudget",
               f"minimal: cacerts volume {vols['cacerts']}, kinds {sorted(kinds)}")


def struct_body(src_dir, name):
    for rs in sorted(pathlib.Path(src_dir).rglob("*.rs")):
        text = rs.read_text()
        m = re.search(rf"pub struct {name}\s*\{{(.*?)\n\}}", text, re.S)
        if m:
            return m.group(1)
    return ""


def flag_table(src_dir):
    """Flags of src/config.rs' `mod flag` table: Flag::new("--name", "ENV")."""
    path = pathlib.Path(src_dir) / "config.rs"
    text = path.read_text() if path.is_file() else ""
    return set(re.findall(r'Flag::new\(\s*"--([a-z0-9-]+)"', text))


def known_flags(src_dir, struct="ServeArgs"):
    """Long flags of `plugca serve`: clap `long` fields of ServeArgs and of the
    structs it flattens (e.g. the controllers' args), wherever they live in
    src/, whether the attribute is on one line or spread over several."""
    names = set()
    body = struct_body(src_dir, struct)
    # An attribute may span lines (rustfmt breaks long ones); `(?:[^()]|\([^()]*\))*`
    # keeps one nesting level of parentheses (e.g. `default_value_t = f()`).
    pattern = (r"#\[(arg|command)\(((?:[^()]|\([^()]*\))*)\)\]\s*"
               r"(?:#\[[^\n]*\]\s*)*pub (\w+):\s*([\w:]+)")
    for m in re.finditer(pattern, body):
        kind, attrs, field, ty = m.groups()
        if kind == "command" and "flatten" in attrs:
            names |= known_flags(src_dir, ty.split("::")[-1])
        elif kind == "arg" and re.search(r"\blong\b", attrs):
            explicit = re.search(r'long\s*=\s*"([a-z0-9-]+)"', attrs)
            names.add(explicit.group(1) if explicit else field.replace("_", "-"))
    return names


def check_flags(path, src_dir):
    clap = known_flags(src_dir)
    table = flag_table(src_dir)
    # The table names flags whose errors config.rs words; each must also be a
    # clap flag (the config test every_flag_an_error_names_is_a_serve_flag_with_that_env
    # checks the same from Rust).
    for f in sorted(table - clap):
        fail(f"--{f} is in src/config.rs' flag table but is not a clap flag of plugca serve")
    known = clap | table
    if not any(d["kind"] == "Deployment" for d in load(path)):
        fail(f"{path} has no Deployment")
        return
    for d in load(path):
        if d["kind"] != "Deployment":
            continue
        for a in container(d)["args"]:
            if not a.startswith("--"):
                continue
            f = a[2:].split("=", 1)[0]
            if f not in known:
                fail(f"--{f} is passed but is not a flag of plugca serve in {src_dir}")
    if not failures:
        print(f"ok: every flag passed is a flag of plugca serve in {src_dir} "
              f"({len(known)} flags, {len(table)} in the config.rs flag table)")


def istio(istiod_path, ztunnel_path, ca_address):
    istiod = load(istiod_path)
    dep = next((d for d in istiod if d["kind"] == "Deployment" and d["metadata"]["name"] == "istiod"), None)
    if dep is None:
        fail(f"{istiod_path}: no Deployment istiod")
        return
    pod = dep["spec"]["template"]["spec"]
    disc = next(c for c in pod["containers"] if c["name"] == "discovery")
    env = {e["name"]: e.get("value") for e in disc.get("env", [])}
    expect(env.get("ENABLE_CA_SERVER") == "false", "istiod: ENABLE_CA_SERVER=false",
           f"istiod: ENABLE_CA_SERVER is {env.get('ENABLE_CA_SERVER')!r}")
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in disc["volumeMounts"]}
    tls = vols.get(mounts.get("/var/run/secrets/istiod/tls"), {}).get("secret", {}).get("secretName")
    ca = vols.get(mounts.get("/var/run/secrets/istiod/ca"), {}).get("configMap", {}).get("name")
    expect(tls == "istiod-tls" and ca == "istio-ca-root-cert",
           "istiod: mounts Secret istiod-tls and ConfigMap istio-ca-root-cert for its serving certificate",
           f"istiod: serving certificate volumes are {tls!r} and {ca!r}")
    injector = next((d for d in istiod if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "istio-sidecar-injector"), None)
    values = (injector or {}).get("data", {}).get("values", "{}")
    got = yaml.safe_load(values).get("global", {}).get("caAddress")
    expect(got == ca_address, f"injector: values global.caAddress={ca_address} (the template's CA_ADDR)",
           f"injector: global.caAddress is {got!r}")
    ds = next((d for d in load(ztunnel_path) if d["kind"] == "DaemonSet"), None)
    if ds is None:
        fail(f"{ztunnel_path}: no DaemonSet")
        return
    zenv = {e["name"]: e.get("value") for e in ds["spec"]["template"]["spec"]["containers"][0]["env"]}
    expect(zenv.get("CA_ADDRESS") == ca_address, f"ztunnel: CA_ADDRESS={ca_address}",
           f"ztunnel: CA_ADDRESS is {zenv.get('CA_ADDRESS')!r}")


def main(argv):
    cmd = argv[1]
    if cmd == "compare":
        compare(argv[2], argv[3])
    elif cmd == "rbac-file":
        rbac_file(argv[2], argv[3])
    elif cmd == "features":
        features(argv[2], argv[3])
    elif cmd == "istio":
        istio(argv[2], argv[3], argv[4])
    elif cmd == "flags":
        check_flags(argv[2], argv[3])
    else:
        sys.exit(f"unknown command {cmd}")
    for f in failures:
        print(f"FAIL: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
