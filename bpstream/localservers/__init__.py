"""Local real servers (Mosquitto, Apache Kafka in KRaft mode, InfluxDB 1.x) for tests and the demo."""
