"""Service discovery: what services exist, how each wants to be balanced, and its endpoints.

Two sources give the same output (:class:`controller.discovery.discovered.ServiceSpec` lists)
behind one interface (:class:`controller.discovery.discovered.Discovery`):

- :mod:`controller.discovery.static`: a YAML file, for labs and bare metal;
- :mod:`controller.discovery.k8s`: Kubernetes Services and EndpointSlices (list + watch),
  converted by the pure :mod:`controller.discovery.k8sobjects`.
"""
