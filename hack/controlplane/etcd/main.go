// Command etcd is etcd's own server main (go.etcd.io/etcd/server/v3/etcdmain), built from
// the module versions pinned in this directory's go.mod. hack/cluster.sh builds and runs it.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
