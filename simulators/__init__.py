"""The physiologically grounded wearable fleet: cohorts, ECG and PPG synthesis, MQTT publishing, datasets."""
