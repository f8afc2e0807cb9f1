"""The device registry: per-device MQTT credentials and the broker's password and ACL files (``bpstream devices``)."""
