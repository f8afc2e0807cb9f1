"""Code every bpstream service uses: message contracts and codecs, topic names, settings, errors, logging."""
