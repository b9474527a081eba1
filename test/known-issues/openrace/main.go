// Command openrace opens, reads and closes clones read-only from a few goroutines, as discovery
// does, for test/known-issues/librbd-open-race.sh. THREADS sets librados_thread_count; SECS how
// long it runs; POOL the pool (it creates a parent and 20 clones there).
package main

import (
	"fmt"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"
)

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "openrace:", err)
		os.Exit(2)
	}
}

// connect opens a connection with librados_thread_count threads.
func connect(threads string) *rados.Conn {
	conn, err := rados.NewConn()
	check(err)
	check(conn.ReadConfigFile(os.Getenv("CEPH_CONF")))
	check(conn.SetConfigOption("librados_thread_count", threads))
	check(conn.Connect())
	return conn
}

func main() {
	secs, _ := strconv.Atoi(os.Getenv("SECS"))
	pool := os.Getenv("POOL")
	setup := connect("2")
	defer setup.Shutdown()
	ioctx, err := setup.OpenIOContext(pool)
	check(err)
	defer ioctx.Destroy()
	check(rbd.CreateImage(ioctx, "parent", 64<<20, rbd.NewRbdImageOptions()))
	parent, err := rbd.OpenImage(ioctx, "parent", rbd.NoSnapshot)
	check(err)
	snap, err := parent.CreateSnapshot("s")
	check(err)
	check(snap.Protect())
	check(parent.Close())
	var names []string
	for i := range 20 {
		name := fmt.Sprintf("clone-%d", i)
		check(rbd.CloneImage(ioctx, "parent", "s", ioctx, name, rbd.NewRbdImageOptions()))
		names = append(names, name)
	}
	// The readers' own connection, as discovery's.
	conn := connect(os.Getenv("THREADS"))
	defer conn.Shutdown()
	rio, err := conn.OpenIOContext(pool)
	check(err)
	defer rio.Destroy()
	var opens atomic.Int64
	var wg sync.WaitGroup
	end := time.Now().Add(time.Duration(secs) * time.Second)
	for w := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; time.Now().Before(end); i++ {
				img, err := rbd.OpenImageReadOnly(rio, names[i%len(names)], rbd.NoSnapshot)
				check(err)
				_, _ = img.GetParent()
				_, _ = img.GetOverlap()
				_, _ = img.GetSize()
				_, _ = img.GetCreateTimestamp()
				check(img.Close())
				if i%7 == 0 { // the parent too, with its children, as discovery walks a chain
					p, err := rbd.OpenImageReadOnly(rio, "parent", rbd.NoSnapshot)
					check(err)
					_, _ = p.ListChildrenAttributes()
					check(p.Close())
				}
				opens.Add(1)
			}
		}()
	}
	wg.Wait()
	fmt.Printf("openrace: %d opens in %d s with librados_thread_count=%s, no crash\n", opens.Load(), secs, os.Getenv("THREADS"))
}
