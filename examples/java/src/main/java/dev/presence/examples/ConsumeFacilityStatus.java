package dev.presence.examples;

import java.io.IOException;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.ByteBuffer;
import java.nio.file.DirectoryStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.time.Instant;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.UUID;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import org.apache.avro.Schema;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericDatumReader;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.io.DecoderFactory;
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
 * <p>Values come in either framing the processor writes, told apart by the first bytes:
 * <ul>
 *   <li>{@code C3 01}: Avro single-object encoding (the default: the writer schema's
 *       CRC-64-AVRO fingerprint, the body), which Avro's {@link BinaryMessageDecoder} reads
 *       natively: it is given the current schema ({@code schemas/facility_status.avsc}) and
 *       every released version ({@code schemas/history/facility_status/}).</li>
 *   <li>{@code 00}: the Schema Registry wire format ({@code schema_registry.framing =
 *       "confluent"}: the writer schema's registry id, 4 bytes big-endian, then the body). The
 *       writer schema is fetched once per id from the registry's Confluent API
 *       ({@code GET <registry>/schemas/ids/<id>}; {@code --registry-url} or
 *       {@code SCHEMA_REGISTRY_URL}, e.g. Apicurio's
 *       {@code http://127.0.0.1:8081/apis/ccompat/v7}) and kept.</li>
 * </ul>
 * Either way old records are resolved to the current schema. The consumer reads with
 * {@code read_committed} isolation, because the processor writes in transactions. Each
 * transition is printed as one JSON line. The latest record per facility is its current status
 * (the topic is compacted); {@code seq} rises by one per transition of a facility, so a
 * consumer that stores it can drop repeats. {@link ConsumeWithApicurioSerde} reads the
 * registry framing with Apicurio's own deserializer instead.
 */
public final class ConsumeFacilityStatus {
    public static void main(String[] args) throws IOException, InterruptedException {
        String brokers = env("KAFKA_BROKERS", "127.0.0.1:9092");
        String topic = "facility-status";
        String group = "facility-status-example-" + UUID.randomUUID();
        String schemas = "../../schemas";
        String registry = env("SCHEMA_REGISTRY_URL", "");
        boolean fromBeginning = false;
        long maxRecords = 0;
        long timeoutSeconds = 0;
        for (int i = 0; i < args.length; i++) {
            switch (args[i]) {
                case "--bootstrap-servers" -> brokers = args[++i];
                case "--topic" -> topic = args[++i];
                case "--group-id" -> group = args[++i];
                case "--schemas" -> schemas = args[++i];
                case "--registry-url" -> registry = args[++i];
                case "--from-beginning" -> fromBeginning = true;
                case "--max-records" -> maxRecords = Long.parseLong(args[++i]);
                case "--timeout" -> timeoutSeconds = Long.parseLong(args[++i]);
                default -> {
                    System.err.println("unknown argument " + args[i] + "; use --bootstrap-servers, --topic, "
                            + "--group-id, --schemas, --registry-url, --from-beginning, --max-records N, --timeout SECONDS");
                    System.exit(2);
                }
            }
        }
        Decoder decoder = new Decoder(Path.of(schemas), registry);

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
                    } catch (IOException | InterruptedException | RuntimeException e) {
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

    /** Decodes values of either framing to the current schema. */
    static final class Decoder {
        private final Schema current;
        private final BinaryMessageDecoder<GenericRecord> singleObject;
        /** The Confluent-compatible API's base URL; empty: none configured. */
        private final String registry;
        private final HttpClient http = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(10)).build();
        /** Each registry id's reader (its writer schema resolved to the current one). */
        private final Map<Integer, GenericDatumReader<GenericRecord>> byId = new HashMap<>();

        Decoder(Path schemas, String registry) throws IOException {
            this.current = new Schema.Parser().parse(schemas.resolve("facility_status.avsc").toFile());
            this.singleObject = new BinaryMessageDecoder<>(GenericData.get(), current);
            Path history = schemas.resolve("history").resolve("facility_status");
            if (Files.isDirectory(history)) {
                try (DirectoryStream<Path> files = Files.newDirectoryStream(history, "*.avsc")) {
                    for (Path f : files) {
                        singleObject.addSchema(new Schema.Parser().parse(f.toFile()));
                    }
                }
            }
            this.registry = registry.replaceAll("/+$", "");
        }

        GenericRecord decode(byte[] value) throws IOException, InterruptedException {
            if (value.length >= 2 && value[0] == (byte) 0xC3 && value[1] == 0x01) {
                return singleObject.decode(value);
            }
            if (value.length >= 5 && value[0] == 0) {
                int id = ByteBuffer.wrap(value, 1, 4).getInt();
                return registered(id).read(null, DecoderFactory.get().binaryDecoder(value, 5, value.length - 5, null));
            }
            throw new IOException("neither Avro single-object encoding (C3 01) nor the Schema Registry framing (00)");
        }

        /** The reader for a registry id: its schema fetched the first time, then kept (an id never changes). */
        private GenericDatumReader<GenericRecord> registered(int id) throws IOException, InterruptedException {
            GenericDatumReader<GenericRecord> known = byId.get(id);
            if (known != null) {
                return known;
            }
            if (registry.isEmpty()) {
                throw new IOException("schema registry id " + id
                        + ": pass --registry-url (or set SCHEMA_REGISTRY_URL) to read the confluent framing");
            }
            URI uri = URI.create(registry + "/schemas/ids/" + Integer.toUnsignedString(id));
            HttpRequest request = HttpRequest.newBuilder(uri)
                    .header("Accept", "application/vnd.schemaregistry.v1+json")
                    .timeout(Duration.ofSeconds(10))
                    .GET()
                    .build();
            HttpResponse<String> response = http.send(request, HttpResponse.BodyHandlers.ofString());
            if (response.statusCode() != 200) {
                throw new IOException("schema registry: GET " + uri + " answered HTTP " + response.statusCode());
            }
            JsonNode schema = new ObjectMapper().readTree(response.body()).get("schema");
            if (schema == null || !schema.isTextual()) {
                throw new IOException("schema registry: GET " + uri + " answered no schema");
            }
            Schema writer = new Schema.Parser().parse(schema.asText());
            GenericDatumReader<GenericRecord> reader = new GenericDatumReader<>(writer, current);
            byId.put(id, reader);
            return reader;
        }
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
