"""The CRDs kopf's peering needs (``kopf.dev/v1`` ClusterKopfPeering and KopfPeering).

Two operator replicas elect one active process through a peering object of
these kinds; the operator creates the object itself at startup
(``MEP_OPERATOR_PEERING_CREATE``), but the CRDs must be installed with the
chart. ``python -m modelendpoint_operator.peering`` prints them.
"""

from __future__ import annotations

PEERING_CRDS_YAML = """\
# kopf peering: the operator replicas announce themselves in the status of one
# peering object; the highest priority runs, the others pause.
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: clusterkopfpeerings.kopf.dev
spec:
  scope: Cluster
  group: kopf.dev
  names:
    kind: ClusterKopfPeering
    plural: clusterkopfpeerings
    singular: clusterkopfpeering
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            status:
              type: object
              x-kubernetes-preserve-unknown-fields: true
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: kopfpeerings.kopf.dev
spec:
  scope: Namespaced
  group: kopf.dev
  names:
    kind: KopfPeering
    plural: kopfpeerings
    singular: kopfpeering
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            status:
              type: object
              x-kubernetes-preserve-unknown-fields: true
"""

if __name__ == "__main__":
    print(PEERING_CRDS_YAML, end="")
