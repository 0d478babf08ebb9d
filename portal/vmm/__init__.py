"""Host access: the only code that touches VM servers (SSH, libvirt, image tools)."""
