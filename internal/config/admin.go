package config

import (
	"errors"
	"os"
)

// Admin says how an admin command (status, unlock, plan) reads its configuration: from the file
// when there is one, from the defaults when there is none (an admin node), and with the command
// line's settings over either.
type Admin struct {
	Path string
	// Required: the file was named (--config), so it must exist.
	Required bool
	// Discovery: the command looks for clones, so the result needs a discovery source.
	Discovery bool
	// Edit sets the command line's settings; it runs before the defaults that depend on what is
	// set and before validation.
	Edit func(*Config)
}

// DefaultAdminUser is ceph.user without a file: the cephx user Ceph's own tools default to.
const DefaultAdminUser = "admin"

// LoadAdmin reads the configuration of an admin command. found says whether a file was read.
// Errors are config.Errors, as Load's.
func LoadAdmin(a Admin) (cfg *Config, found bool, err error) {
	data, err := os.ReadFile(a.Path)
	switch {
	case err == nil:
		found = true
	case errors.Is(err, os.ErrNotExist) && !a.Required:
		data = nil
	default:
		_, err = Load(a.Path) // its message
		return nil, false, err
	}
	cfg, err = guard(a.Path, func() (*Config, error) {
		c, places, es := decode(a.Path, data)
		if len(es) > 0 {
			return nil, es
		}
		if !found {
			c.Ceph.User = DefaultAdminUser
		}
		if a.Edit != nil {
			a.Edit(&c)
		}
		c.applyPresenceDefaults(places)
		if es := c.validateFor(places, a.Discovery); len(es) > 0 {
			return nil, es
		}
		return &c, nil
	})
	return cfg, found, err
}
