#!/usr/bin/env python3
"""tests/peer/k8s-manifests.py: the checks of tests/peer/k8s-manifests.sh (which
installs what this needs and runs it; run that, not this).

usage: k8s-manifests.py --k8s-version V [--k8s-version V ...] --src REPO DIR

Checks, offline, every Kubernetes manifest under DIR (*.yaml, *.yml; DIR/schemas/
is skipped):

  1. Every object against the JSON schema of its kind for each Kubernetes version
     V, strictly (a field the schema does not know is an error): built-in kinds
     with the schemas kubernetes-validate bundles; kinds it has none for (CRDs such
     as VolumeSnapshotClass, and kustomize's Kustomization) with the schema named
     KIND-GROUP-VERSION.json in DIR/schemas/. A kind with neither is an error.
  2. The kustomization: every resource it lists exists, and every manifest at the
     top of DIR is listed.
  3. That the objects fit together: the CSIDriver's name is the provisioner of
     every StorageClass and the driver of every VolumeSnapshotClass; PVCs and
     VolumeSnapshots name classes defined here; bindings name roles and service
     accounts defined here; namespaces used are defined here (or are "default");
     the DaemonSet's sidecars all use the driver's socket /csi/csi.sock, whose host
     directory is /var/lib/kubelet/plugins/DRIVER, the path the registrar hands the
     kubelet; kubernetes-csi sidecar images are pinned to a release.
  4. That they fit the driver as REPO/src/csi/ defines it: its name (DRIVER_NAME),
     its topology key (TOPOLOGY_KEY, in allowedTopologies), the parameters it takes
     (VOLUME_PARAMETERS and MAKE_PARAMETERS for StorageClasses,
     SNAPSHOT_PARAMETERS for VolumeSnapshotClasses: it refuses any other), and
     that a replicateKeyFile or restoreFrom path is one the driver's container
     has (a key file: in a Secret volume).
  5. DIR/Dockerfile: present, a multi-stage build from rust:1-bookworm to
     debian:bookworm-slim with fuse3, installing /usr/local/bin/snapfs; the
     csi.proto checksum it pins is that of ../shared/third_party/csi-spec-v1.9.0
     when that is there.

Prints each failure, then "k8s-manifests: N passed, N failed"; exits 1 if any
check failed, 2 if it could not run.
"""

import argparse
import glob
import hashlib
import json
import os
import re
import sys

import jsonschema
import referencing
import yaml
from kubernetes_validate import utils as kv

SOCKET_DIR = "/csi"
SOCKET = "/csi/csi.sock"
KUBELET_PLUGINS = "/var/lib/kubelet/plugins"
REGISTRY_DIR = "/var/lib/kubelet/plugins_registry"
SIDECAR_IMAGE = re.compile(r"^registry\.k8s\.io/sig-storage/[a-z0-9-]+:v\d+\.\d+\.\d+$")

passed = 0
failures = []


def ok():
    global passed
    passed += 1


def fail(msg):
    failures.append(msg)
    print(f"FAIL {msg}", flush=True)


def check(cond, msg):
    if cond:
        ok()
    else:
        fail(msg)
    return cond


# ---------------------------------------------------------------- loading


def manifest_files(root):
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not (dirpath == root and d == "schemas"))
        for f in sorted(filenames):
            if f.endswith((".yaml", ".yml")):
                out.append(os.path.join(dirpath, f))
    return out


class StrictLoader(yaml.SafeLoader):
    """YAML as the API server's strict decoding reads it: a key twice in one mapping
    is an error (PyYAML would keep the last one silently)."""


def _mapping_without_duplicates(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"found the key {key!r} twice", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_docs(path):
    with open(path) as f:
        try:
            return [d for d in yaml.load_all(f, Loader=StrictLoader) if d is not None]
        except yaml.YAMLError as e:
            fail(f"{path}: not YAML: {e}")
            return []


def name_of(doc):
    meta = doc.get("metadata") or {}
    return f"{doc.get('kind', '?')}/{meta.get('name', '?')}"


# ---------------------------------------------------------------- schemas


def schema_version_dir(version):
    """The directory kubernetes-validate would use for `version`: the newest it
    bundles that is not newer (compared as major.minor numbers)."""

    def mm(v):
        return tuple(int(x) for x in kv.major_minor(v).split("."))

    want = mm(version.lstrip("v"))
    usable = [v for v in kv.all_versions() if mm(v) <= want]
    if not usable:
        raise SystemExit(f"kubernetes-validate {kv.__version__} has no schemas for Kubernetes {version}")
    if mm(usable[-1]) != want:
        print(f"note: kubernetes-validate has no {version}; using {kv.major_minor(usable[-1])}")
    return f"v{usable[-1]}-local-strict"


def local_schema_path(schemas_dir, doc):
    # kubernetes-validate's naming: kind-GROUPPREFIX-VERSION.json, where
    # snapshot.storage.k8s.io/v1 gives "snapshot-v1" and v1 gives "v1".
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", str(doc["apiVersion"]))
    return os.path.join(schemas_dir, f"{str(doc['kind']).lower()}-{api}.json")


_local_validators = {}


def local_validator(schema_path, version):
    key = (schema_path, version)
    if key not in _local_validators:
        with open(schema_path) as f:
            schema = json.load(f)
        definitions = kv.schema_contents(
            f"kubernetes-json-schema/{schema_version_dir(version)}/_definitions.json", version
        )
        registry = referencing.Registry().with_resources(
            [
                (definitions["$id"], referencing.Resource.from_contents(definitions)),
                (schema["$id"], referencing.Resource.from_contents(schema)),
            ]
        )
        jsonschema.validators.Draft202012Validator.check_schema(schema)
        _local_validators[key] = jsonschema.validators.Draft202012Validator(schema, registry=registry)
    return _local_validators[key]


def validate_doc(path, doc, versions, schemas_dir):
    if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
        fail(f"{path}: a document without apiVersion and kind")
        return
    what = f"{path}: {name_of(doc)}"
    local = local_schema_path(schemas_dir, doc)
    for version in versions:
        if os.path.isfile(local):
            errors = sorted(local_validator(local, version).iter_errors(doc), key=lambda e: list(e.path))
            if errors:
                for e in errors:
                    where = ".".join(str(p) for p in e.path) or "(top)"
                    fail(f"{what} (Kubernetes {version}, {os.path.basename(local)}): {where}: {e.message}")
            else:
                ok()
            continue
        try:
            kv.validate(doc, version, strict=True)
            ok()
        except kv.ValidationError as e:
            where = ".".join(str(p) for p in e.path) or "(top)"
            fail(f"{what} (Kubernetes {version}): {where}: {e.message}")
        except kv.SchemaNotFoundError as e:
            fail(f"{what}: {e.message}, and there is no schemas/{os.path.basename(local)}")
        except kv.VersionNotSupportedError as e:
            raise SystemExit(f"kubernetes-validate {kv.__version__}: {e.message}")


# ---------------------------------------------------------------- kustomization


def check_kustomization(root, docs_by_file):
    path = os.path.join(root, "kustomization.yaml")
    kfile = "kustomization.yaml"
    if not check(os.path.isfile(path), f"{kfile}: missing"):
        return
    docs = docs_by_file.get(path) or [{}]
    listed = docs[0].get("resources") or []
    for r in listed:
        check(os.path.exists(os.path.join(root, r)), f"{kfile}: resource {r} does not exist")
    top = sorted(
        os.path.basename(p)
        for p in glob.glob(os.path.join(root, "*.y*ml"))
        if os.path.basename(p) != "kustomization.yaml"
    )
    for f in top:
        check(f in listed, f"{kfile}: {f} is not listed in resources")


# ---------------------------------------------------------------- coherence


def args_map(container):
    """--flag=value arguments of a container, as a dict (--flag alone: True)."""
    out = {}
    for a in (container.get("args") or []) + (container.get("command") or []):
        a = str(a)
        if a.startswith("--"):
            k, _, v = a.partition("=")
            out[k] = v if _ else True
    return out


def check_coherence(all_docs):
    by_kind = {}
    for path, doc in all_docs:
        by_kind.setdefault(doc.get("kind"), []).append((path, doc))

    def names(kind, namespace=None):
        return {
            d["metadata"]["name"]
            for _, d in by_kind.get(kind, [])
            if namespace is None or d["metadata"].get("namespace") == namespace
        }

    drivers = by_kind.get("CSIDriver", [])
    if not check(len(drivers) == 1, f"expected one CSIDriver, found {len(drivers)}"):
        return
    driver = drivers[0][1]["metadata"]["name"]

    for path, sc in by_kind.get("StorageClass", []):
        check(
            sc.get("provisioner") == driver,
            f"{path}: {name_of(sc)}: provisioner {sc.get('provisioner')!r} is not the CSIDriver {driver!r}",
        )
        check(
            sc.get("volumeBindingMode") == "WaitForFirstConsumer",
            f"{path}: {name_of(sc)}: volumeBindingMode must be WaitForFirstConsumer (per-node provisioning)",
        )
    for path, vsc in by_kind.get("VolumeSnapshotClass", []):
        check(
            vsc.get("driver") == driver,
            f"{path}: {name_of(vsc)}: driver {vsc.get('driver')!r} is not the CSIDriver {driver!r}",
        )
    storage_classes = names("StorageClass")
    for path, pvc in by_kind.get("PersistentVolumeClaim", []):
        sc = (pvc.get("spec") or {}).get("storageClassName")
        check(sc in storage_classes, f"{path}: {name_of(pvc)}: StorageClass {sc!r} is not defined here")
    snapshot_classes = names("VolumeSnapshotClass")
    for path, vs in by_kind.get("VolumeSnapshot", []):
        vsc = (vs.get("spec") or {}).get("volumeSnapshotClassName")
        check(vsc in snapshot_classes, f"{path}: {name_of(vs)}: VolumeSnapshotClass {vsc!r} is not defined here")

    namespaces = names("Namespace") | {"default"}
    for path, doc in all_docs:
        ns = (doc.get("metadata") or {}).get("namespace")
        if ns is not None:
            check(ns in namespaces, f"{path}: {name_of(doc)}: namespace {ns!r} is not defined here")

    for path, b in by_kind.get("ClusterRoleBinding", []) + by_kind.get("RoleBinding", []):
        ref = b.get("roleRef") or {}
        ns = b["metadata"].get("namespace")
        have = names("ClusterRole") if ref.get("kind") == "ClusterRole" else names("Role", ns)
        check(ref.get("name") in have, f"{path}: {name_of(b)}: {ref.get('kind')} {ref.get('name')!r} is not defined here")
        for s in b.get("subjects") or []:
            if s.get("kind") == "ServiceAccount":
                sa_ns = s.get("namespace", ns)
                check(
                    s.get("name") in names("ServiceAccount", sa_ns),
                    f"{path}: {name_of(b)}: ServiceAccount {sa_ns}/{s.get('name')} is not defined here",
                )

    plugins = [
        (p, d)
        for p, d in by_kind.get("DaemonSet", [])
        if any("--kubelet-registration-path" in args_map(c) for c in d["spec"]["template"]["spec"]["containers"])
    ]
    if not check(len(plugins) == 1, f"expected one DaemonSet with a node-driver-registrar, found {len(plugins)}"):
        return
    path, ds = plugins[0]
    pod = ds["spec"]["template"]["spec"]
    what = f"{path}: {name_of(ds)}"
    ns = ds["metadata"].get("namespace")
    sa = pod.get("serviceAccountName")
    check(sa in names("ServiceAccount", ns), f"{what}: serviceAccountName {sa!r} is not a ServiceAccount in {ns}")
    volumes = {v["name"]: v for v in pod.get("volumes") or []}

    def host_path(volume_name):
        return ((volumes.get(volume_name) or {}).get("hostPath") or {}).get("path", "").rstrip("/")

    def mount_of(container, path):
        for m in container.get("volumeMounts") or []:
            if m["mountPath"].rstrip("/") == path:
                return m
        return None

    plugin_dir = f"{KUBELET_PLUGINS}/{driver}"
    socket_users = 0
    for c in pod["containers"]:
        a = args_map(c)
        cwhat = f"{what}: container {c['name']}"
        image = str(c.get("image", ""))
        if image.startswith("registry.k8s.io/"):
            check(SIDECAR_IMAGE.match(image) is not None, f"{cwhat}: image {image} is not pinned to a vX.Y.Z release")
        endpoint = a.get("--csi-address") or a.get("--endpoint")
        if endpoint is None:
            continue
        socket_users += 1
        want = SOCKET if "--csi-address" in a else f"unix://{SOCKET}"
        check(endpoint == want, f"{cwhat}: socket {endpoint!r}, expected {want!r}")
        m = mount_of(c, SOCKET_DIR)
        check(m is not None, f"{cwhat}: does not mount {SOCKET_DIR}")
        if m is not None:
            check(
                host_path(m["name"]) == plugin_dir,
                f"{cwhat}: {SOCKET_DIR} is host directory {host_path(m['name'])!r}, expected {plugin_dir!r}",
            )
        if "--kubelet-registration-path" in a:
            check(
                a["--kubelet-registration-path"] == f"{plugin_dir}/csi.sock",
                f"{cwhat}: --kubelet-registration-path {a['--kubelet-registration-path']!r}, expected {plugin_dir}/csi.sock",
            )
            m = mount_of(c, "/registration")
            check(
                m is not None and host_path(m["name"]) == REGISTRY_DIR,
                f"{cwhat}: /registration must be the host's {REGISTRY_DIR}",
            )
        if "--endpoint" in a:
            check(
                (c.get("securityContext") or {}).get("privileged") is True,
                f"{cwhat}: the driver container must be privileged (FUSE mounts)",
            )
            prop = [
                m
                for m in c.get("volumeMounts") or []
                if m.get("mountPropagation") == "Bidirectional" and host_path(m["name"]) == "/var/lib/kubelet"
            ]
            check(len(prop) == 1, f"{cwhat}: needs /var/lib/kubelet with mountPropagation Bidirectional")
            check(mount_of(c, "/dev/fuse") is not None, f"{cwhat}: does not mount /dev/fuse")
    check(socket_users >= 2, f"{what}: expected the driver and its sidecars on {SOCKET}")


# ---------------------------------------------------------------- the driver


def driver_facts(src):
    """What the driver's source says: its name, topology key and parameters."""
    facts = {}
    texts = {}
    for f in ("src/csi/mod.rs", "src/csi/controller.rs"):
        try:
            with open(os.path.join(src, f)) as fh:
                texts[f] = fh.read()
        except OSError as e:
            fail(f"cannot read the driver's source: {e}")
            return None
    mod, ctl = texts["src/csi/mod.rs"], texts["src/csi/controller.rs"]

    def const_str(text, name):
        m = re.search(rf'pub const {name}: &str = "([^"]+)";', text)
        return m.group(1) if m else None

    def const_list(text, name, tuples):
        m = re.search(rf"const {name}: &\[[^\]]*\] = &\[(.*?)\];", text, re.S)
        if not m:
            return None
        item = r'\(\s*"([^"]+)"\s*,' if tuples else r'"([^"]+)"'
        return set(re.findall(item, m.group(1))) or None

    facts["driver"] = const_str(mod, "DRIVER_NAME")
    facts["topology_key"] = const_str(mod, "TOPOLOGY_KEY")
    vol = const_list(mod, "VOLUME_PARAMETERS", True)
    make = const_list(mod, "MAKE_PARAMETERS", False)
    snap = const_list(ctl, "SNAPSHOT_PARAMETERS", False)
    facts["volume_parameters"] = (vol | make) if vol and make else None
    facts["snapshot_parameters"] = snap
    missing = [k for k, v in facts.items() if not v]
    if not check(not missing, f"src/csi/: cannot find {', '.join(missing)} (did their definitions change shape?)"):
        return None
    return facts


def check_driver_fit(all_docs, facts):
    by_kind = {}
    for path, doc in all_docs:
        by_kind.setdefault(doc.get("kind"), []).append((path, doc))
    for path, d in by_kind.get("CSIDriver", []):
        check(
            d["metadata"]["name"] == facts["driver"],
            f"{path}: {name_of(d)}: the driver calls itself {facts['driver']!r}",
        )

    # The driver's container: its mounts, and which of them are Secret volumes.
    mounts, secret_mounts = [], []
    for _, ds in by_kind.get("DaemonSet", []):
        pod = ds["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        for c in pod["containers"]:
            if "--endpoint" not in args_map(c):
                continue
            for m in c.get("volumeMounts") or []:
                mounts.append(m["mountPath"].rstrip("/"))
                if "secret" in volumes.get(m["name"], {}):
                    secret_mounts.append(m["mountPath"].rstrip("/"))

    def under(p, dirs):
        return any(p == d or p.startswith(d + "/") for d in dirs)

    def check_params(path, obj, params, allowed):
        for k, v in (params or {}).items():
            if k.startswith("csi.storage.k8s.io/"):
                continue
            check(k in allowed, f"{path}: {name_of(obj)}: parameter {k!r}: the driver takes {', '.join(sorted(allowed))}")
            check(
                isinstance(v, str) and not any(ch in v for ch in '\n",'),
                f"{path}: {name_of(obj)}: parameter {k}: {v!r} must be a string without newline, double quote or comma",
            )
            if k == "replicateKeyFile":
                check(
                    under(str(v), secret_mounts),
                    f"{path}: {name_of(obj)}: replicateKeyFile {v} is not in a Secret volume of the driver's container",
                )
            if k == "restoreFrom" and str(v).startswith("/"):
                check(
                    under(str(v), mounts),
                    f"{path}: {name_of(obj)}: restoreFrom {v} is not in a directory the driver's container mounts",
                )

    for path, sc in by_kind.get("StorageClass", []):
        check_params(path, sc, sc.get("parameters"), facts["volume_parameters"])
        for term in sc.get("allowedTopologies") or []:
            for e in term.get("matchLabelExpressions") or []:
                check(
                    e.get("key") == facts["topology_key"],
                    f"{path}: {name_of(sc)}: allowedTopologies key {e.get('key')!r} is not the driver's {facts['topology_key']!r}",
                )
    for path, vsc in by_kind.get("VolumeSnapshotClass", []):
        check_params(path, vsc, vsc.get("parameters"), facts["snapshot_parameters"])


# ---------------------------------------------------------------- Dockerfile


def check_dockerfile(root, src):
    path = "Dockerfile"
    if not check(os.path.isfile(os.path.join(root, path)), f"{path}: missing"):
        return
    text = open(os.path.join(root, path)).read()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    check("rust:1-bookworm" in froms, f"{path}: no build stage FROM rust:1-bookworm")
    check(bool(froms) and froms[-1] == "debian:bookworm-slim", f"{path}: the final stage is not FROM debian:bookworm-slim")
    check(re.search(r"cargo build --release", text) is not None, f"{path}: no `cargo build --release`")
    check(re.search(r"apt-get install[^\n]*\bfuse3\b", text) is not None, f"{path}: fuse3 is not installed")
    check("/usr/local/bin/snapfs" in text, f"{path}: snapfs is not put at /usr/local/bin/snapfs")
    ignore = "Dockerfile.dockerignore"
    ipath = os.path.join(root, ignore)
    check(
        os.path.isfile(ipath) and re.search(r"^/?target/?$", open(ipath).read(), re.M) is not None,
        f"{ignore}: missing, or does not keep target/ out of the build context",
    )
    m = re.search(r"--checksum=sha256:([0-9a-f]{64})\s*\\?\s*\S*csi\.proto", text)
    check(m is not None, f"{path}: does not pin csi.proto by its sha256")
    proto = os.path.join(src, "../shared/third_party/csi-spec-v1.9.0/csi.proto")
    if m is not None and os.path.isfile(proto):
        with open(proto, "rb") as fh:
            have = hashlib.sha256(fh.read()).hexdigest()
        check(have == m.group(1), f"{path}: pins csi.proto as sha256:{m.group(1)}, {os.path.normpath(proto)} is {have}")


# ---------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k8s-version", action="append", required=True)
    ap.add_argument("--src", required=True, help="the repository (its src/csi/ defines the driver)")
    ap.add_argument("dir")
    args = ap.parse_args()
    root = os.path.abspath(args.dir)
    schemas_dir = os.path.join(root, "schemas")
    if not os.path.isdir(root):
        raise SystemExit(f"{root}: not a directory")

    files = manifest_files(root)
    if not files:
        raise SystemExit(f"{root}: no manifests")
    docs_by_file = {p: load_docs(p) for p in files}
    all_docs = [(os.path.relpath(p, root), d) for p in files for d in docs_by_file[p]]
    print(
        f"kubernetes-validate {kv.__version__}, Kubernetes {' '.join(args.k8s_version)}: "
        f"{len(all_docs)} objects in {len(files)} files under {root}",
        flush=True,
    )
    for rel, doc in all_docs:
        validate_doc(rel, doc, args.k8s_version, schemas_dir)
    check_kustomization(root, docs_by_file)
    try:
        check_coherence([(r, d) for r, d in all_docs if isinstance(d, dict) and d.get("kind") != "Kustomization"])
    except (KeyError, TypeError, AttributeError) as e:
        # Only reachable with objects that failed their schema already.
        fail(f"the cross-object checks stopped at a malformed object: {type(e).__name__}: {e}")
    docs = [(r, d) for r, d in all_docs if isinstance(d, dict) and d.get("kind") != "Kustomization"]
    facts = driver_facts(os.path.abspath(args.src))
    if facts is not None:
        try:
            check_driver_fit(docs, facts)
        except (KeyError, TypeError, AttributeError) as e:
            fail(f"the checks against the driver stopped at a malformed object: {type(e).__name__}: {e}")
    check_dockerfile(root, os.path.abspath(args.src))

    print(f"k8s-manifests: {passed} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
