#!/usr/bin/env python3
"""The deployment files hold together, without a cluster or a Docker daemon.

Every flag that deploy/k8s and docker-compose.yml give lychee-trainer and lychee-inference is one
that the binary's --help lists. deploy/k8s: every document parses; the kustomization names every
manifest; each Service selects the pods of exactly one workload and targets ports they declare;
each workload's selector matches its pods; the ports the servers --listen (and --http-listen) on
are their containers' ports; the trainer is a StatefulSet whose --registry-dir is a volume claim;
every gRPC probe asks the port its container serves gRPC on, and the inference pods are ready
through one; --trainer is a Service's name and port; HAProxy resolves a headless Service on its
ports. docker-compose.yml: the profile `replicas` is the replicas and the balancer, built from
Dockerfile stages; the replicas follow the trainer on its port, their health check asks their
gRPC port, the balancer sends to the ports they listen on and publishes the ones it binds. The
HAProxy configurations that the balancers' arguments make are accepted by `haproxy -c`.

Run from the source root (ctest does): tests/deploy/manifests_test.py LYCHEE_TRAINER LYCHEE_INFERENCE
"""
import os
import re
import subprocess
import sys
import tempfile

import yaml

failures = []


def check(condition, message):
    if not condition:
        failures.append(message)
    return condition


def flags_of(binary):
    """The flags that `binary --help` lists in its first column ("  --tls-cert FILE --tls-key FILE")."""
    usage = subprocess.run([binary, "--help"], capture_output=True, text=True)
    flags = set()
    for line in (usage.stdout + usage.stderr).splitlines():
        if line.startswith("  --"):
            flags.update(re.findall(r"--[a-z][a-z0-9-]*", re.split(r"\s{2,}", line.strip())[0]))
    check(flags, f"{binary} --help lists no flags")
    return flags


def flag_values(args, flag):
    return [a.split("=", 1)[1] for a in args if a.startswith(flag + "=")]


def port_of(address):
    """The port of HOST:PORT, [HOST]:PORT or a bare PORT."""
    return int(address.rsplit(":", 1)[-1])


def check_flags(args, known, where):
    for arg in args:
        if arg.startswith("--"):
            check(arg.split("=", 1)[0] in known, f"{where}: {arg.split('=', 1)[0]} is not a flag its binary takes")


def balancer_config_is_valid(args, where):
    """Runs scripts/haproxy-config.sh with a balancer's arguments and `haproxy -c` on the result."""
    result = subprocess.run(["scripts/haproxy-config.sh"] + args, capture_output=True, text=True)
    if not check(result.returncode == 0, f"{where}: haproxy-config.sh {args} failed: {result.stderr}"):
        return
    with tempfile.NamedTemporaryFile("w", suffix=".cfg") as config:
        config.write(result.stdout)
        config.flush()
        checked = subprocess.run(["haproxy", "-c", "-f", config.name], capture_output=True, text=True)
        check(checked.returncode == 0, f"{where}: haproxy -c refuses the configuration: {checked.stdout}{checked.stderr}")


def balancer_replicas(args, where):
    """The (host, gRPC port, HTTP port) of the balancer's one NAME*COUNT=HOST:GRPC:HTTP argument."""
    replicas = [a for a in args if not a.startswith("--")]
    match = re.fullmatch(r"[\w-]+\*\d+=([\w.-]+):(\d+):(\d+)", replicas[0]) if len(replicas) == 1 else None
    check(match is not None, f"{where}: the balancer's replicas {replicas} are not one NAME*COUNT=HOST:GRPC:HTTP")
    return (match[1], int(match[2]), int(match[3])) if match else None


def load_k8s():
    with open("deploy/k8s/kustomization.yaml") as f:
        kustomization = yaml.safe_load(f)
    listed = set(kustomization["resources"])
    present = {name for name in os.listdir("deploy/k8s") if name.endswith(".yaml") and name != "kustomization.yaml"}
    check(listed == present, f"kustomization.yaml lists {sorted(listed)}, deploy/k8s holds {sorted(present)}")
    documents = []
    for name in sorted(present):
        with open(os.path.join("deploy/k8s", name)) as f:
            for document in yaml.safe_load_all(f):
                if check(isinstance(document, dict) and "kind" in document, f"{name}: a document without a kind"):
                    documents.append(document)
    return documents


def by_kind(documents, kind):
    return {d["metadata"]["name"]: d for d in documents if d["kind"] == kind}


def container_of(workload):
    return workload["spec"]["template"]["spec"]["containers"][0]


def container_ports(workload):
    return {port["name"]: port["containerPort"]
            for container in workload["spec"]["template"]["spec"]["containers"]
            for port in container.get("ports", [])}


def check_server(workload, known_flags):
    """A lychee server's flags exist, it listens on its grpc (and http) container ports, and its
    gRPC probes ask the grpc port."""
    name = workload["metadata"]["name"]
    container = container_of(workload)
    ports = container_ports(workload)
    check_flags(container["args"], known_flags, name)
    check([port_of(a) for a in flag_values(container["args"], "--listen")] == [ports.get("grpc")],
          f"{name}: --listen is not the grpc container port {ports.get('grpc')}")
    http = flag_values(container["args"], "--http-listen")
    check([port_of(a) for a in http] == ([ports["http"]] if "http" in ports else []),
          f"{name}: --http-listen {http} is not the http container port {ports.get('http')}")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if "grpc" in container.get(probe, {}):
            check(container[probe]["grpc"]["port"] == ports.get("grpc"),
                  f"{name}: the {probe} asks port {container[probe]['grpc']['port']}, not the grpc port")


def check_k8s(documents, trainer_flags, inference_flags):
    services = by_kind(documents, "Service")
    workloads = {**by_kind(documents, "Deployment"), **by_kind(documents, "StatefulSet")}
    for workload in workloads.values():
        check(workload["spec"]["selector"]["matchLabels"].items() <=
              workload["spec"]["template"]["metadata"]["labels"].items(),
              f"{workload['metadata']['name']}: the selector does not match its pods")
    for name, service in services.items():
        selected = [w for w in workloads.values()
                    if service["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        if not check(len(selected) == 1, f"Service {name} selects {len(selected)} workloads, not one"):
            continue
        ports = container_ports(selected[0])
        for port in service["spec"]["ports"]:
            check(port["targetPort"] in ports, f"Service {name}: targetPort {port['targetPort']} is not a container port")

    trainer = by_kind(documents, "StatefulSet").get("lychee-trainer")
    if check(trainer is not None, "no StatefulSet lychee-trainer"):
        check_server(trainer, trainer_flags)
        claims = {claim["metadata"]["name"] for claim in trainer["spec"].get("volumeClaimTemplates", [])}
        mounts = {m["name"]: m["mountPath"] for m in container_of(trainer).get("volumeMounts", [])}
        registry = flag_values(container_of(trainer)["args"], "--registry-dir")
        check(len(registry) == 1 and any(mounts.get(claim) == registry[0] for claim in claims),
              "the trainer's --registry-dir is not on a volume claim")
        check(trainer["spec"]["serviceName"] in services, "the trainer's serviceName is not a Service")

    inference = by_kind(documents, "Deployment").get("lychee-inference")
    if check(inference is not None, "no Deployment lychee-inference"):
        check_server(inference, inference_flags)
        container = container_of(inference)
        check("grpc" in container.get("readinessProbe", {}), "the inference pods' readiness is not gRPC health")
        trainer_address = flag_values(container["args"], "--trainer")
        if check(len(trainer_address) == 1, "the inference pods name no --trainer"):
            host, port = trainer_address[0].rsplit(":", 1)
            check(host in services and any(p["port"] == int(port) for p in services[host]["spec"]["ports"]),
                  f"--trainer={trainer_address[0]} is not a Service's name and port")

    balancer = by_kind(documents, "Deployment").get("lychee-balancer")
    if check(balancer is not None, "no Deployment lychee-balancer"):
        args = [a.replace("$(NAMESPACE)", "default") for a in container_of(balancer)["args"]]
        replicas = balancer_replicas(args, "deploy/k8s/balancer.yaml")
        if replicas:
            host, grpc_port, http_port = replicas
            service_name = host.removesuffix(".default.svc.cluster.local")
            check(service_name != host, f"the balancer resolves {host}, not a Service's full name (no search domains)")
            service = services.get(service_name)
            check(service is not None and service["spec"].get("clusterIP") == "None",
                  f"the balancer resolves {service_name}, which is not a headless Service")
            if service is not None:
                check({p["port"] for p in service["spec"]["ports"]} == {grpc_port, http_port},
                      f"the balancer's ports are not {service_name}'s")
        for flag, port in (("--grpc-bind", "grpc"), ("--http-bind", "http"), ("--stats-bind", "stats")):
            check([port_of(a) for a in flag_values(args, flag)] == [container_ports(balancer).get(port)],
                  f"the balancer's {flag} is not its {port} container port")
        balancer_config_is_valid(args, "deploy/k8s/balancer.yaml")


def check_compose(trainer_flags, inference_flags):
    with open("docker-compose.yml") as f:
        compose = yaml.safe_load(f)
    with open("Dockerfile") as f:
        stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", f.read(), re.MULTILINE | re.IGNORECASE))
    services = compose["services"]
    for name, service in services.items():
        target = service.get("build", {}).get("target")
        check(target in stages, f"docker-compose.yml: {name} builds the stage {target}, not one of {sorted(stages)}")
        known = {"trainer": trainer_flags, "inference": inference_flags}.get(target)
        if known:
            check_flags(service["command"], known, f"docker-compose.yml: {name}")
    in_profile = {name for name, service in services.items() if "replicas" in service.get("profiles", [])}
    if not check(in_profile == {"inference-replica", "balancer"}, f"the profile replicas holds {sorted(in_profile)}"):
        return
    replica, balancer, trainer = services["inference-replica"], services["balancer"], services["trainer"]
    trainer_port = port_of(flag_values(trainer["command"], "--listen")[0])
    check(flag_values(replica["command"], "--trainer") == [f"trainer:{trainer_port}"],
          "the compose replicas do not follow the trainer on its --listen port")
    grpc_port = [port_of(a) for a in flag_values(replica["command"], "--listen")]
    http_port = [port_of(a) for a in flag_values(replica["command"], "--http-listen")]
    health = replica["healthcheck"]["test"]
    check(len(grpc_port) == 1 and f"127.0.0.1:{grpc_port[0]}" in health,
          f"the replicas' health check {health} does not ask their gRPC port")
    replicas = balancer_replicas(balancer["command"], "docker-compose.yml")
    if replicas:
        check(replicas == ("inference-replica", *grpc_port, *http_port),
              f"the compose balancer sends to {replicas}, the replicas listen on {grpc_port} and {http_port}")
    published = {int(p.rsplit(":", 1)[1]) for p in balancer.get("ports", [])}
    bound = {port_of(a) for flag in ("--grpc-bind", "--http-bind", "--stats-bind")
             for a in flag_values(balancer["command"], flag)}
    check(published == bound, f"the compose balancer publishes {sorted(published)} and binds {sorted(bound)}")
    balancer_config_is_valid(balancer["command"], "docker-compose.yml")


if len(sys.argv) != 3:
    sys.exit(__doc__)
trainer_flags, inference_flags = flags_of(sys.argv[1]), flags_of(sys.argv[2])
check_k8s(load_k8s(), trainer_flags, inference_flags)
check_compose(trainer_flags, inference_flags)
for failure in failures:
    print("FAILED:", failure)
print(f"{len(failures)} failures")
sys.exit(1 if failures else 0)
