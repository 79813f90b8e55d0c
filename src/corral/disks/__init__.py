"""disks."""
