"""Discovery of what traffic from outside the node reaches (NodePorts, external and
LoadBalancer IPs, externalTrafficPolicy, the node of each endpoint), from Kubernetes
objects through the reconciler to the model the agents apply, and the packet path's
frontends planned from it (dataplane.nodeport, pure)."""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner

from controller import reconcile
from controller.discovery import k8sobjects
from dataplane import cli, model, nodeport
from dataplane.api import convert


def k8s_service(name: str = "web", *, ports: list[dict[str, Any]] | None = None,
                **spec: Any) -> dict[str, Any]:
    body = {"clusterIP": "10.96.0.10", "type": "NodePort",
            "ports": ports or [{"name": "http", "port": 80, "nodePort": 30080}], **spec}
    status = body.pop("status", {})
    return {"metadata": {"namespace": "default", "name": name}, "spec": body,
            "status": status}


def k8s_slice(service: str = "web", nodes: tuple[str, ...] = ("node-a", "node-b")) -> dict:
    return {
        "metadata": {"namespace": "default", "name": f"{service}-x",
                     "labels": {k8sobjects.SERVICE_NAME_LABEL: service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": [f"10.244.{i}.5"], "conditions": {"ready": True},
                       "nodeName": node} for i, node in enumerate(nodes, 1)],
    }


def snapshot(*services: dict[str, Any], slices: list[dict[str, Any]] | None = None
             ) -> tuple[model.Snapshot, list[str]]:
    result = k8sobjects.build(services, slices if slices is not None else [k8s_slice()])
    rec = reconcile.Reconciler()
    rec.set_specs(result.specs, 0.0)
    snap = rec.tick(0.0)
    assert snap is not None
    return snap, result.notes


def test_nodeport_external_and_load_balancer_ips_reach_the_model() -> None:
    snap, notes = snapshot(k8s_service(
        type="LoadBalancer", externalIPs=["198.51.100.20"], externalTrafficPolicy="Local",
        status={"loadBalancer": {"ingress": [{"ip": "198.51.100.7"},
                                             {"hostname": "lb.example"}]}}))
    (svc,) = snap.services
    assert svc.node_port == 30080
    assert svc.external_ips == ("198.51.100.7", "198.51.100.20")
    assert svc.external_traffic_policy == model.TrafficPolicy.LOCAL
    assert {b.address: b.node for b in svc.backends} == {"10.244.1.5": "node-a",
                                                         "10.244.2.5": "node-b"}
    assert notes == []
    fes = nodeport.frontends(snap.services)
    assert set(fes) == {("0.0.0.0", 30080, "tcp"), ("198.51.100.7", 80, "tcp"),
                        ("198.51.100.20", 80, "tcp")}
    assert all(fe.local and fe.service_key == ("10.96.0.10", 80, "tcp")
               for fe in fes.values())
    assert fes[("0.0.0.0", 30080, "tcp")].node_port
    on_a = {svc.identity(b) for b in svc.backends if b.node == "node-a"}
    assert nodeport.local_members(snap.services, on_a.__contains__) == {
        svc.name: ["10.244.1.5:8080/tcp"]}


def test_a_cluster_ip_service_has_no_frontend_and_cluster_is_the_default_policy() -> None:
    snap, _ = snapshot(k8s_service(type="ClusterIP", ports=[{"name": "http", "port": 80}]))
    (svc,) = snap.services
    assert svc.node_port is None and svc.external_ips == ()
    assert svc.external_traffic_policy == model.TrafficPolicy.CLUSTER
    assert nodeport.frontends(snap.services) == {}
    assert nodeport.local_members(snap.services, lambda _: True) == {}


def test_ipv6_and_bad_external_ips_are_noted_and_skipped() -> None:
    _, notes = snapshot(k8s_service(externalIPs=["2001:db8::1", "nonsense", "10.96.0.10"]))
    assert any("2001:db8::1 is IPv6" in n for n in notes)
    assert any("'nonsense' is not an IP address" in n for n in notes)
    assert any("10.96.0.10 cannot be a frontend" in n for n in notes)


def test_a_second_claim_on_an_external_ip_and_port_is_noted_and_not_served() -> None:
    other = k8s_service("aaa", externalIPs=["198.51.100.20"],
                        ports=[{"name": "http", "port": 80, "nodePort": 30081}])
    other["spec"]["clusterIP"] = "10.96.0.11"
    snap, notes = snapshot(other, k8s_service("web", externalIPs=["198.51.100.20"]),
                           slices=[k8s_slice("aaa"), k8s_slice("web")])
    assert [s.external_ips for s in snap.services] == [("198.51.100.20",), ()]
    assert [s.node_port for s in snap.services] == [30081, 30080]
    assert any("198.51.100.20:80/tcp is already default/aaa's" in n for n in notes)


def test_the_model_refuses_two_services_on_one_frontend_and_round_trips_the_fields() -> None:
    a = model.Service("a", "10.96.0.10", 80, node_port=30080, external_ips=("198.51.100.2",
                                                                           "198.51.100.1"),
                      external_traffic_policy="local",
                      backends=(model.Backend("10.244.1.5", 8080, node="n1"),))
    assert a.external_ips == ("198.51.100.1", "198.51.100.2")  # sorted
    b = model.Service("b", "10.96.0.11", 80, node_port=30080)
    with pytest.raises(model.ModelError, match=r"services\[b\]\.node_port: \*:30080/tcp is "
                                               r"already a frontend of service 'a'"):
        model.DesiredState((a, b))
    with pytest.raises(model.ModelError, match=r"external_ips\[1\]: 198.51.100.1 listed twice"):
        model.Service("c", "10.96.0.12", 80, external_ips=("198.51.100.1", "198.51.100.1"))
    with pytest.raises(model.ModelError, match="external_traffic_policy: must be one of"):
        model.Service("c", "10.96.0.12", 80, external_traffic_policy="Local")
    assert convert.service_from_pb(convert.service_to_pb(a), "s") == a
    assert model.service_from_dict(a.to_dict()) == a


@pytest.mark.parametrize("args, message", [
    (["--snat-ports", "5000-4000"], "--snat-ports: expected MIN-MAX within 1024-65535"),
    (["--snat-ports", "80-90"], "--snat-ports: expected MIN-MAX within 1024-65535"),
    (["--snat-ip", "10.0.0.1.2"], "is not an IPv4 address"),
])
def test_agent_refuses_bad_packet_path_options_before_touching_anything(
        tmp_path: Any, args: list[str], message: str) -> None:
    res = CliRunner().invoke(cli.main, ["agent", "--config", str(tmp_path / "absent.yaml"),
                                        "--external-interface", "eth0", *args])
    assert res.exit_code == 2 and message in res.output, res.output


def test_snat_ip_alone_is_refused() -> None:
    res = CliRunner().invoke(cli.main, ["agent", "--config", "x.yaml", "--snat-ip", "10.0.0.1"])
    assert res.exit_code == 2 and "--snat-ip needs --external-interface" in res.output


def test_an_external_ip_the_address_rule_refuses_is_noted_not_fatal() -> None:
    # The model's one address rule (loopback, broadcast): discovery leaves such an IP
    # out rather than hand the model a service it would refuse whole.
    snap, notes = snapshot(k8s_service(externalIPs=["127.0.0.5", "255.255.255.255",
                                                    "198.51.100.20"]))
    (svc,) = snap.services
    assert svc.external_ips == ("198.51.100.20",)
    assert any("127.0.0.5 cannot be a frontend" in n for n in notes)
    assert any("255.255.255.255 cannot be a frontend" in n for n in notes)


def test_an_ipv6_only_service_keeps_its_socket_path_and_has_no_packet_path() -> None:
    svc6 = k8s_service(externalIPs=["198.51.100.20"])
    svc6["spec"]["clusterIP"] = "fd00:96::a"
    slice6 = k8s_slice()
    slice6["addressType"] = "IPv6"
    slice6["endpoints"] = [{"addresses": ["fd00:244:1::5"], "conditions": {"ready": True},
                            "nodeName": "node-a"}]
    snap, notes = snapshot(svc6, slices=[slice6])
    (svc,) = snap.services
    assert svc.vip == "fd00:96::a"
    assert svc.node_port is None and svc.external_ips == ()
    assert any("IPv6-only" in n and "packet path is IPv4" in n for n in notes)


def test_the_model_checks_frontends_in_the_maps_128_bit_form() -> None:
    # An external IP equal to the VIP is caught although ipv4() and the VIP's number
    # differ in width (the VIP is held as ::ffff:a.b.c.d).
    with pytest.raises(model.ModelError, match=r"external_ips\[0\]: 10.96.0.10 is the "
                                               r"service's own VIP"):
        model.Service("a", "10.96.0.10", 80, external_ips=("10.96.0.10",))
    with pytest.raises(model.ModelError, match=r"external_ips.*loopback"):
        model.Service("a", "10.96.0.10", 80, external_ips=("127.0.0.1",))
    with pytest.raises(model.ModelError, match="the packet path serves IPv4 only"):
        model.Service("a", "fd00::a", 80, node_port=30080)
    # Dual stack: the IPv4 VIP carries the packet path, the backends have IPv4 addresses.
    dual = model.Service("a", "10.96.0.10", 80, vip6="fd00::a", node_port=30080,
                         backends=(model.Backend("10.244.1.5", 8080, address6="fd00::5",
                                                 node="n1"),))
    assert convert.service_from_pb(convert.service_to_pb(dual), "s") == dual
    assert model.service_from_dict(dual.to_dict()) == dual
    (fe,) = nodeport.frontends([dual]).values()
    assert fe.service_key == ("10.96.0.10", 80, "tcp")
