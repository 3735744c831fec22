package dev.presence.examples;

import java.io.IOException;
import java.nio.file.DirectoryStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.time.Instant;
import java.util.List;
import java.util.Properties;
import java.util.UUID;

import org.apache.avro.Schema;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.message.BinaryMessageDecoder;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.StringDeserializer;

/**
 * Prints facility transitions from presence's {@code facility-status} topic as they arrive:
 * a downstream Java service's starting point.
 *
 * <p>Values are Avro single-object encoding (C3 01, the writer schema's CRC-64-AVRO
 * fingerprint, the body), which Avro's {@link BinaryMessageDecoder} reads natively: it is
 * given the current schema ({@code schemas/facility_status.avsc}) and every released version
 * ({@code schemas/history/facility_status/}), and resolves old records to the current schema.
 * The consumer reads with {@code read_committed} isolation, because the processor writes in
 * transactions. Each transition is printed as one JSON line. The latest record per facility
 * is its current status (the topic is compacted); {@code seq} rises by one per transition of a
 * facility, so a consumer that stores it can drop repeats.
 */
public final class ConsumeFacilityStatus {
    public static void main(String[] args) throws IOException {
        String brokers = env("KAFKA_BROKERS", "127.0.0.1:9092");
        String topic = "facility-status";
        String group = "facility-status-example-" + UUID.randomUUID();
        String schemas = "../../schemas";
        boolean fromBeginning = false;
        long maxRecords = 0;
        long timeoutSeconds = 0;
        for (int i = 0; i < args.length; i++) {
            switch (args[i]) {
                case "--bootstrap-servers" -> brokers = args[++i];
                case "--topic" -> topic = args[++i];
                case "--group-id" -> group = args[++i];
                case "--schemas" -> schemas = args[++i];
                case "--from-beginning" -> fromBeginning = true;
                case "--max-records" -> maxRecords = Long.parseLong(args[++i]);
                case "--timeout" -> timeoutSeconds = Long.parseLong(args[++i]);
                default -> {
                    System.err.println("unknown argument " + args[i] + "; use --bootstrap-servers, --topic, "
                            + "--group-id, --schemas, --from-beginning, --max-records N, --timeout SECONDS");
                    System.exit(2);
                }
            }
        }
        BinaryMessageDecoder<GenericRecord> decoder = decoder(Path.of(schemas));

        Properties props = new Properties();
        props.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, brokers);
        props.put(ConsumerConfig.GROUP_ID_CONFIG, group);
        props.put(ConsumerConfig.ISOLATION_LEVEL_CONFIG, "read_committed");
        props.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, fromBeginning ? "earliest" : "latest");
        props.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
        props.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());

        Instant deadline = timeoutSeconds > 0 ? Instant.now().plusSeconds(timeoutSeconds) : Instant.MAX;
        long printed = 0;
        try (KafkaConsumer<String, byte[]> consumer = new KafkaConsumer<>(props)) {
            consumer.subscribe(List.of(topic));
            while (maxRecords == 0 || printed < maxRecords) {
                if (Instant.now().isAfter(deadline)) {
                    System.err.println("stopping: " + timeoutSeconds + " s passed");
                    System.exit(maxRecords > 0 ? 1 : 0);
                }
                for (ConsumerRecord<String, byte[]> r : consumer.poll(Duration.ofMillis(500))) {
                    GenericRecord s;
                    try {
                        s = decoder.decode(r.value());
                    } catch (IOException | RuntimeException e) {
                        System.err.printf("%s/%d@%d: %s%n", r.topic(), r.partition(), r.offset(), e);
                        continue;
                    }
                    System.out.printf(
                            "{\"facility_id\":%s,\"region_id\":%s,\"status\":\"%s\",\"open_sessions\":%d,"
                                    + "\"since\":%d,\"seq\":%d,\"emitted_at\":%d}%n",
                            json(s.get("facility_id")), json(s.get("region_id")), s.get("status"),
                            (Integer) s.get("open_sessions"), (Long) s.get("since"), (Long) s.get("seq"),
                            (Long) s.get("emitted_at"));
                    System.out.flush();
                    printed++;
                }
            }
        }
    }

    /** The current schema, plus every released version the decoder may meet. */
    static BinaryMessageDecoder<GenericRecord> decoder(Path schemas) throws IOException {
        Schema current = new Schema.Parser().parse(schemas.resolve("facility_status.avsc").toFile());
        BinaryMessageDecoder<GenericRecord> decoder = new BinaryMessageDecoder<>(GenericData.get(), current);
        Path history = schemas.resolve("history").resolve("facility_status");
        if (Files.isDirectory(history)) {
            try (DirectoryStream<Path> files = Files.newDirectoryStream(history, "*.avsc")) {
                for (Path f : files) {
                    decoder.addSchema(new Schema.Parser().parse(f.toFile()));
                }
            }
        }
        return decoder;
    }

    /** A JSON string literal. */
    static String json(Object value) {
        StringBuilder b = new StringBuilder("\"");
        for (char c : value.toString().toCharArray()) {
            switch (c) {
                case '"' -> b.append("\\\"");
                case '\\' -> b.append("\\\\");
                default -> {
                    if (c < 0x20) {
                        b.append(String.format("\\u%04x", (int) c));
                    } else {
                        b.append(c);
                    }
                }
            }
        }
        return b.append('"').toString();
    }

    static String env(String name, String fallback) {
        String v = System.getenv(name);
        return v == null || v.isEmpty() ? fallback : v;
    }

    private ConsumeFacilityStatus() {}
}
