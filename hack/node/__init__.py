"""The real node of the local cluster: containerd, runc, CNI, kubelet and kube-proxy.

``node.config`` renders their configuration (pure); ``node.run`` starts and
stops them beside a control plane from ``localcluster``; ``host-setup.sh``
prepares the machine (as root, every time).
"""
