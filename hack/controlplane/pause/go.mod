// The pod sandbox ("pause") program of the local node (hack/cluster.sh up --with-node). No
// registry is reachable to pull one, so hack/cluster.sh builds it and wraps it in an image of
// its own. It has no dependencies.
module nbd-export-controller/hack/controlplane/pause

go 1.25.0
