"""modelendpoint-operator: reconciles ModelEndpoint resources into vLLM runtime Deployments.

Layout:
- :mod:`.constants`: API group, names, labels, the field manager.
- :mod:`.settings`: operator settings from ``MEP_OPERATOR_*`` environment variables.
- :mod:`.spec`, :mod:`.manifests`, :mod:`.status`: pure functions (no I/O):
  spec defaults, child manifests and container env, status from the Deployment.
- :mod:`.k8s`: the only module that talks to the Kubernetes API (besides kopf itself).
- :mod:`.handlers`: thin kopf handlers; :mod:`.main`: the console script.
"""

__version__ = "0.1.0"
