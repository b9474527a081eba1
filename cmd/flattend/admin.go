package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/flattend/flattend/internal/cephconn"
	"github.com/flattend/flattend/internal/config"
)

// adminOptions are the flags of the admin commands (status, unlock, plan), which run from an
// admin node without a flattend config: Ceph's own connection flags, as rbd takes them, and the
// lock's place. Empty: not given.
type adminOptions struct {
	conf, id, name, keyring string
	lockPool, lockImage     string
	node                    string              // plan
	pools                   []config.PoolSource // plan
}

// adminFlags defines the flags every admin command has.
func adminFlags(fs *flag.FlagSet, a *adminOptions) {
	fs.StringVar(&a.conf, "conf", "", "ceph.conf to read (default: $CEPH_CONF, else the config's ceph.conf, /etc/ceph/ceph.conf)")
	fs.StringVar(&a.conf, "c", "", "short for --conf")
	fs.StringVar(&a.id, "id", "", "cephx id to connect as, e.g. admin for client.admin (default: the config's ceph.user; admin without a config file)")
	fs.StringVar(&a.name, "name", "", "cephx name to connect as, e.g. client.admin")
	fs.StringVar(&a.name, "n", "", "short for --name")
	fs.StringVar(&a.keyring, "keyring", "", "keyring file (default: the config's ceph.keyring, else what ceph.conf says)")
	fs.StringVar(&a.keyring, "k", "", "short for --keyring")
}

// lockFlags are the lock's place, for status and unlock.
func lockFlags(fs *flag.FlagSet, a *adminOptions) {
	fs.StringVar(&a.lockPool, "lock-pool", "", "pool of the lock images (default: the config's lock.pool, rbd)")
	fs.StringVar(&a.lockImage, "lock-image", "", "name of the lock image (default: the config's lock.image, flattend-lock)")
}

// planSourceFlags are plan's own: whose clones, found where.
func planSourceFlags(fs *flag.FlagSet, a *adminOptions) {
	fs.StringVar(&a.node, "node", "", "the node to plan for (default: the config's node, else this host's short name)")
	fs.Func("pool", "POOL or POOL/NAMESPACE whose clones tagged with the node are listed, instead of the config's discovery (repeatable)",
		func(v string) error {
			pool, ns, _ := strings.Cut(v, "/")
			a.pools = append(a.pools, config.PoolSource{Pool: pool, Namespace: ns, OwnerKey: config.DefaultOwnerKey})
			return nil
		})
}

// loadConfig reads a command's configuration. The admin commands read the file only if there is
// one (or --config names it), then take, over it, CEPH_CONF and CEPH_ARGS, then their own flags,
// as rbd does (librados reads the other options of CEPH_ARGS itself, for every command).
func loadConfig(o options, cmd command) (cfg *config.Config, found bool, err error) {
	if !cmd.admin {
		cfg, err = config.Load(o.config)
		return cfg, true, err
	}
	env, err := cephconn.ParseArgs(strings.Fields(os.Getenv("CEPH_ARGS")))
	if err != nil {
		return nil, false, fmt.Errorf("CEPH_ARGS: %w", err)
	}
	a := o.admin
	if cmd.discovers && !o.configSet && len(a.pools) == 0 {
		if _, err := os.Stat(o.config); errors.Is(err, os.ErrNotExist) {
			return nil, false, fmt.Errorf("%s does not exist and no --pool is given: name the pools to look in with --pool POOL (and the node with --node NODE), or write the config (--config)", o.config)
		}
	}
	id := a.id
	if a.name != "" {
		if id, err = cephconn.NameToID(a.name); err != nil {
			return nil, false, err
		}
	}
	cfg, found, err = config.LoadAdmin(config.Admin{Path: o.config, Required: o.configSet, Discovery: cmd.discovers,
		Edit: func(c *config.Config) {
			c.Ceph.Conf = first(a.conf, env.Conf, os.Getenv("CEPH_CONF"), c.Ceph.Conf)
			c.Ceph.User = first(id, env.ID, c.Ceph.User)
			c.Ceph.Keyring = first(a.keyring, env.Keyring, c.Ceph.Keyring)
			c.Lock.Pool = first(a.lockPool, c.Lock.Pool)
			c.Lock.Image = first(a.lockImage, c.Lock.Image)
			c.Node = first(a.node, c.Node)
			if len(a.pools) > 0 {
				c.Discovery.Pools, c.Discovery.Libvirt = a.pools, nil
			}
		}})
	return cfg, found, err
}

// first is the first non-empty string.
func first(s ...string) string {
	for _, v := range s {
		if v != "" {
			return v
		}
	}
	return ""
}

// lockSlots is the config status and unlock read the lock with. Without a config file, lock.slots
// is 0, which withSlots takes for "as many as the lock has" (lock.SlotsFound).
func lockSlots(e *env) *config.Config {
	if e.fromFile {
		return e.cfg
	}
	c := *e.cfg
	c.Lock.Slots = 0
	return &c
}
