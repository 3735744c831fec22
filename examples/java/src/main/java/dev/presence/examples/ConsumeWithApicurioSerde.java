package dev.presence.examples;

import java.time.Duration;
import java.time.Instant;
import java.util.List;
import java.util.Properties;
import java.util.UUID;

import io.apicurio.registry.serde.SerdeConfig;
import io.apicurio.registry.serde.avro.AvroKafkaDeserializer;
import org.apache.avro.generic.GenericRecord;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.common.errors.RecordDeserializationException;
import org.apache.kafka.common.serialization.StringDeserializer;

/**
 * Prints facility transitions from {@code facility-status} written in the Schema Registry
 * framing ({@code schema_registry.framing = "confluent"}: 00, a 4-byte schema id, the body),
 * decoded by Apicurio Registry's own {@link AvroKafkaDeserializer} rather than by hand: the
 * consumer an Apicurio shop already runs.
 *
 * <p>The serde talks to Apicurio's own API ({@code --registry-url}, default
 * {@code http://127.0.0.1:8081/apis/registry/v2}, not the {@code /apis/ccompat/v7} one presence
 * is configured with). Two settings make it read what Confluent-compatible writers write:
 * {@code apicurio.registry.as-confluent=true} (a 4-byte id after the magic byte, where
 * Apicurio's own framing has 8) and {@code apicurio.registry.use-id=contentId} (the ids that
 * Apicurio's Confluent API hands out, and so the ones presence writes, are content ids).
 * Records are returned in their writer's schema; every released version has the fields printed
 * here. A record in the single-object framing cannot be read this way: it is reported and
 * skipped. Output and options are those of {@link ConsumeFacilityStatus}.
 */
public final class ConsumeWithApicurioSerde {
    public static void main(String[] args) {
        String brokers = ConsumeFacilityStatus.env("KAFKA_BROKERS", "127.0.0.1:9092");
        String topic = "facility-status";
        String group = "facility-status-example-" + UUID.randomUUID();
        String registry = ConsumeFacilityStatus.env("APICURIO_REGISTRY_URL", "http://127.0.0.1:8081/apis/registry/v2");
        boolean fromBeginning = false;
        long maxRecords = 0;
        long timeoutSeconds = 0;
        for (int i = 0; i < args.length; i++) {
            switch (args[i]) {
                case "--bootstrap-servers" -> brokers = args[++i];
                case "--topic" -> topic = args[++i];
                case "--group-id" -> group = args[++i];
                case "--registry-url" -> registry = args[++i];
                case "--from-beginning" -> fromBeginning = true;
                case "--max-records" -> maxRecords = Long.parseLong(args[++i]);
                case "--timeout" -> timeoutSeconds = Long.parseLong(args[++i]);
                default -> {
                    System.err.println("unknown argument " + args[i] + "; use --bootstrap-servers, --topic, "
                            + "--group-id, --registry-url, --from-beginning, --max-records N, --timeout SECONDS");
                    System.exit(2);
                }
            }
        }

        Properties props = new Properties();
        props.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, brokers);
        props.put(ConsumerConfig.GROUP_ID_CONFIG, group);
        props.put(ConsumerConfig.ISOLATION_LEVEL_CONFIG, "read_committed");
        props.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, fromBeginning ? "earliest" : "latest");
        props.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
        props.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, AvroKafkaDeserializer.class.getName());
        props.put(SerdeConfig.REGISTRY_URL, registry);
        // The Confluent framing: 4-byte ids (Legacy4ByteIdHandler) ...
        props.put(SerdeConfig.ENABLE_CONFLUENT_ID_HANDLER, "true");
        // ... that are content ids, as Apicurio's Confluent API (/apis/ccompat/v7) gives them out.
        props.put(SerdeConfig.USE_ID, "contentId");

        Instant deadline = timeoutSeconds > 0 ? Instant.now().plusSeconds(timeoutSeconds) : Instant.MAX;
        long printed = 0;
        try (KafkaConsumer<String, GenericRecord> consumer = new KafkaConsumer<>(props)) {
            consumer.subscribe(List.of(topic));
            while (maxRecords == 0 || printed < maxRecords) {
                if (Instant.now().isAfter(deadline)) {
                    System.err.println("stopping: " + timeoutSeconds + " s passed");
                    System.exit(maxRecords > 0 ? 1 : 0);
                }
                Iterable<ConsumerRecord<String, GenericRecord>> records;
                try {
                    records = consumer.poll(Duration.ofMillis(500));
                } catch (RecordDeserializationException e) {
                    // Not in the registry's framing (or an id the registry does not know):
                    // report it and go on after it, rather than stop the stream there.
                    System.err.printf("%s@%d: %s%n", e.topicPartition(), e.offset(), e.getMessage());
                    consumer.seek(e.topicPartition(), e.offset() + 1);
                    continue;
                }
                for (ConsumerRecord<String, GenericRecord> r : records) {
                    GenericRecord s = r.value();
                    System.out.printf(
                            "{\"facility_id\":%s,\"region_id\":%s,\"status\":\"%s\",\"open_sessions\":%d,"
                                    + "\"since\":%d,\"seq\":%d,\"emitted_at\":%d}%n",
                            ConsumeFacilityStatus.json(s.get("facility_id")), ConsumeFacilityStatus.json(s.get("region_id")),
                            s.get("status"), (Integer) s.get("open_sessions"), (Long) s.get("since"),
                            (Long) s.get("seq"), (Long) s.get("emitted_at"));
                    System.out.flush();
                    printed++;
                }
            }
        }
    }

    private ConsumeWithApicurioSerde() {}
}
